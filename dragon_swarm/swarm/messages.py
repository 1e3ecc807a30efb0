"""Protobuf message classes for our own small RPCs, built from a descriptor at import (hivemind's handlers take
protobuf types; a generated module would be one more build step for two or three flat messages)."""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_TYPES = {
    "bytes": descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
    "string": descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
    "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
}


def build_messages(package: str, spec: dict[str, tuple[tuple[str, str], ...]]) -> dict[str, type]:
    """{message name: ((field name, type), ...)} -> {message name: class}. A type ending in '*' is repeated."""
    proto = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package, syntax="proto3")
    for name, fields in spec.items():
        message = proto.message_type.add(name=name)
        for number, (field_name, kind) in enumerate(fields, start=1):
            repeated = kind.endswith("*")
            label = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED if repeated else descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
            message.field.add(name=field_name, number=number, type=_TYPES[kind.rstrip("*")], label=label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}")) for name in spec}
