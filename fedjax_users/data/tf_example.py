"""``tf.train.Example`` protos read without TensorFlow: the message types from a descriptor, parsed by ``protobuf``.

TensorFlow Federated's sqlite files (fedjax_users.data.tff) hold one serialized
``tf.train.Example`` per row. breaching parses them with ``tf.io.parse_example`` and a
``FixedLenFeature(shape=(), dtype=...)`` per feature, which needs TensorFlow (about 600 MB) for
a few bytes of wire format. Here the same messages are declared in a ``FileDescriptorProto``
whose names and field numbers are those of TensorFlow's ``core/example/example.proto`` and
``core/example/feature.proto`` (proto3, package ``tensorflow``)::

    message Example   { Features features = 1; }
    message Features  { map<string, Feature> feature = 1; }
    message Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    message BytesList { repeated bytes value = 1; }
    message FloatList { repeated float value = 1 [packed = true]; }
    message Int64List { repeated int64 value = 1 [packed = true]; }

and ``protobuf``'s own parser (already installed with flax: orbax-checkpoint needs it) decodes
them. Declaring the schema, rather than walking the wire format by hand, keeps every encoding
rule (packed and unpacked repeated fields, unknown fields, map entries, negative varints) with
the library that defines them. The types live in a private descriptor pool, so they never clash
with TensorFlow's own ``tensorflow.Example`` should both be imported in one process.

``parse_fixed`` then applies ``FixedLenFeature(shape=())``'s rules: every feature asked for is
present, of its kind, with exactly one value; features not asked for are ignored.

Example::

    >>> from fedjax_users.data import tf_example
    >>> example = tf_example.Example()
    >>> example.features.feature["snippets"].bytes_list.value.append(b"To be")
    >>> tf_example.parse_fixed(example.SerializeToString(), {"snippets": tf_example.BYTES})
    {'snippets': b'To be'}
"""

from __future__ import annotations

from typing import Mapping, Union

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from fedjax_users.data.errors import DataError

__all__ = ["BYTES", "Example", "FLOAT", "Feature", "INT64", "KINDS", "Value", "parse_fixed"]

BYTES, FLOAT, INT64 = "bytes_list", "float_list", "int64_list"  # the names of Feature's oneof members
KINDS = (BYTES, FLOAT, INT64)
Value = Union[bytes, float, int]

_FIELD = descriptor_pb2.FieldDescriptorProto


def _field(name: str, number: int, kind: int, label: int = _FIELD.LABEL_OPTIONAL, type_name: str = "",
           oneof: int | None = None, packed: bool = False) -> _FIELD:
    field = _FIELD(name=name, number=number, type=kind, label=label, json_name=name)
    if type_name:
        field.type_name = type_name
    if oneof is not None:
        field.oneof_index = oneof
    if packed:
        field.options.packed = True
    return field


def _file() -> descriptor_pb2.FileDescriptorProto:
    """TensorFlow's ``example.proto`` and ``feature.proto`` (the messages ``Example`` needs) as one file."""
    proto = descriptor_pb2.FileDescriptorProto(name="fedjax_users/tf_example.proto", package="tensorflow",
                                               syntax="proto3")
    repeated = _FIELD.LABEL_REPEATED
    proto.message_type.add(name="BytesList").field.append(_field("value", 1, _FIELD.TYPE_BYTES, repeated))
    proto.message_type.add(name="FloatList").field.append(
        _field("value", 1, _FIELD.TYPE_FLOAT, repeated, packed=True))
    proto.message_type.add(name="Int64List").field.append(
        _field("value", 1, _FIELD.TYPE_INT64, repeated, packed=True))
    feature = proto.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, message) in enumerate(zip(KINDS, ("BytesList", "FloatList", "Int64List")), start=1):
        feature.field.append(_field(name, number, _FIELD.TYPE_MESSAGE, type_name=f".tensorflow.{message}", oneof=0))
    features = proto.message_type.add(name="Features")
    # ``map<string, Feature> feature = 1`` is, on the wire and in a descriptor, a repeated entry message.
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.append(_field("key", 1, _FIELD.TYPE_STRING))
    entry.field.append(_field("value", 2, _FIELD.TYPE_MESSAGE, type_name=".tensorflow.Feature"))
    features.field.append(_field("feature", 1, _FIELD.TYPE_MESSAGE, repeated,
                                 type_name=".tensorflow.Features.FeatureEntry"))
    proto.message_type.add(name="Example").field.append(
        _field("features", 1, _FIELD.TYPE_MESSAGE, type_name=".tensorflow.Features"))
    return proto


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())
Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.Example"))
Feature = message_factory.GetMessageClass(_POOL.FindMessageTypeByName("tensorflow.Feature"))


def parse_fixed(serialized: bytes, spec: Mapping[str, str]) -> dict[str, Value]:
    """The features of ``spec`` in a serialized ``tf.train.Example``, as ``tf.io.FixedLenFeature(shape=())`` reads them.

    Args:
        serialized: one serialized ``tf.train.Example``.
        spec: feature name -> its kind (``BYTES``, ``FLOAT`` or ``INT64``), breaching's parse spec.

    Returns:
        Feature name -> its one value (``bytes``, ``float`` or ``int``), in ``spec``'s order.

    Raises:
        DataError: the bytes are not an ``Example``, or a feature is missing, of another kind, or has
            other than one value (``tf.io.parse_example`` refuses each of these as well).

    Example::

        >>> example = Example()
        >>> example.features.feature["score"].int64_list.value.append(-3)
        >>> parse_fixed(example.SerializeToString(), {"score": INT64})
        {'score': -3}
    """
    example = Example()
    try:
        example.ParseFromString(serialized)
    except (DecodeError, TypeError) as err:
        raise DataError(f"not a serialized tf.train.Example: {err}") from None
    features, found = example.features.feature, {}
    for name, kind in spec.items():
        if name not in features:
            raise DataError(f"tf.train.Example lacks the feature {name!r} (present: {', '.join(sorted(features))})")
        feature = features[name]
        stored = feature.WhichOneof("kind")
        if stored != kind:
            raise DataError(f"tf.train.Example feature {name!r} is a {stored or 'feature without values'}, "
                            f"expected a {kind}")
        values = getattr(feature, kind).value
        if len(values) != 1:
            raise DataError(f"tf.train.Example feature {name!r} holds {len(values)} values, expected 1")
        found[name] = values[0]
    return found
