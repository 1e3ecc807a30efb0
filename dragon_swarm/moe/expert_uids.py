"""Expert uids (`<prefix>.<layer>.<index>`, hivemind's grid convention) and the pure rules that pick them."""

from __future__ import annotations

import re

_RANGE = re.compile(r"^\[(\d*):(\d*)\]$")


class ExpertSpecError(ValueError):
    pass


def expert_uid(prefix: str, layer: int, index: int) -> str:
    return f"{prefix}.{layer}.{index}"


def all_expert_uids(prefix: str, num_layers: int, num_experts: int) -> list[str]:
    return [expert_uid(prefix, layer, index) for layer in range(num_layers) for index in range(num_experts)]


def parse_uid(uid: str) -> tuple[str, int, int]:
    prefix, layer, index = uid.rsplit(".", 2)
    return prefix, int(layer), int(index)


def _split_top_level(spec: str) -> list[str]:
    items, depth, current = [], 0, []
    for char in spec:
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _expand_coordinate(token: str, limit: int, what: str, item: str) -> list[int]:
    match = _RANGE.match(token)
    if match:
        start = int(match.group(1) or 0)
        stop = int(match.group(2) or limit)
        values = list(range(start, stop))
    elif token == "*":
        values = list(range(limit))
    elif token.isdigit():
        values = [int(token)]
    else:
        raise ExpertSpecError(f"bad {what} '{token}' in expert spec '{item}' (use a number, [a:b] or *)")
    bad = [v for v in values if not 0 <= v < limit]
    if bad or not values:
        raise ExpertSpecError(f"{what} {bad or token} out of range in '{item}': this swarm has {limit} {what}s")
    return values


def expand_expert_spec(spec: str, prefix: str, num_layers: int, num_experts: int) -> list[str]:
    """Turn `--experts` into uids.

    Accepts a comma list of `all`, `LAYER.INDEX`, `ffn.LAYER.INDEX` (`ffn` stands for this swarm's expert
    prefix) or full uids, where LAYER and INDEX may be hivemind grid ranges such as `[0:4]` or `*`.
    """
    uids: list[str] = []
    for item in _split_top_level(spec):
        if item == "all":
            uids.extend(all_expert_uids(prefix, num_layers, num_experts))
            continue
        parts = item.split(".")
        if len(parts) == 3 and parts[0] in ("ffn", prefix):
            parts = parts[1:]
        if len(parts) != 2:
            raise ExpertSpecError(
                f"cannot read expert spec '{item}': expected LAYER.INDEX, ffn.LAYER.INDEX or {prefix}.LAYER.INDEX"
            )
        layers = _expand_coordinate(parts[0], num_layers, "layer", item)
        indices = _expand_coordinate(parts[1], num_experts, "expert index", item)
        uids.extend(expert_uid(prefix, layer, index) for layer in layers for index in indices)
    if not uids:
        raise ExpertSpecError("expert spec selects no experts")
    return list(dict.fromkeys(uids))
