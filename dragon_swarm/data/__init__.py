"""Data pipeline: corpus loading (`corpus`), the pinned tokenizer (`tokenizer`), batch sharding (`sharding`),
and cached token streams (`dataset`). Submodules are imported explicitly, so `python -m ...corpus fetch`
does not pay for torch.
"""
