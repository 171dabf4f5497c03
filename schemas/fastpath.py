"""Avro binary writer and reader functions compiled from a schema: the codec's fast path.

fastavro interprets the schema on every record (a dispatch per field, a `_validate` per union branch, a
logical-type call per timestamp). For chatpipe's schemas - records, `["null", X]` unions, arrays, maps,
strings, numbers, `timestamp-micros` and `uuid` - `compile_writer`/`compile_reader` generate straight-line
Python once per schema instead (the `.avsc` stays the one source of truth: nothing here is hand-written per
record).

The contract is fastavro's, byte for byte and value for value:

- `compile_writer(schema)(record, buf)` appends exactly what `fastavro.schemaless_writer(fo, schema, record)`
  writes, for every record made of the exact built-in types fastavro documents (aware datetimes for
  timestamps, `str` for strings and uuids, ...). Anything else - a missing key (fastavro fills defaults), a
  naive datetime, an int for a timestamp, a `UUID` object, tuple notation, a value out of range or of the
  wrong type - raises, and the caller must then call fastavro itself, which encodes it or raises its error.
- `compile_reader(schema)(data, pos)` returns what `fastavro.schemaless_reader(BytesIO(data[pos:]), schema,
  None)` returns (dicts in field order, aware UTC datetimes, `uuid.UUID`s) for data written with this very
  schema. On malformed data it raises; the caller must then let fastavro decide (it raises its own error).

Both raise `Unsupported` at compile time for anything outside that subset (other logical types, unions
other than null + one type, recursive records, ...): the caller then uses fastavro for that schema.
Must not be used for schema resolution (writer != reader): that stays fastavro's.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MICROSECOND = timedelta(microseconds=1)
_MIN_LONG, _MAX_LONG = -(1 << 63), (1 << 63) - 1
_MIN_INT, _MAX_INT = -(1 << 31), (1 << 31) - 1
_PRIMITIVES = ("null", "boolean", "int", "long", "float", "double", "bytes", "string")
_NAMED = ("record", "enum", "fixed")
#: lengths below this are looked up in a table of pre-encoded varints instead of computed
_TABLE = 4096

Writer = Callable[[Any, bytearray], None]
Reader = Callable[[bytes, int], tuple[Any, int]]
#: how `compile_reader` builds one record type: (constructor, {Avro field name: keyword argument})
Build = tuple[Callable[..., Any], Mapping[str, str]]


class Unsupported(Exception):
    """The schema uses something the compiler does not handle; use fastavro for it."""


def varint(n: int) -> bytes:
    """The Avro (zig-zag, variable-length) encoding of the long `n`; OverflowError outside 64 bits."""
    if not _MIN_LONG <= n <= _MAX_LONG:
        raise OverflowError(f"{n} does not fit an Avro long")
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [varint(i) for i in range(_TABLE)]  # non-negative longs
_NEG = [varint(-i) for i in range(_TABLE)]  # _NEG[i] encodes -i
# union index 1 (b"\x02") followed by a length: one append instead of two for ["null", "string"]
_UNION1_SMALL = [b"\x02" + b for b in _SMALL]
#: for hand-written encoders: `LENGTHS[n] == write_long(n)` and `UNION1_LENGTHS[n] == b"\x02" + write_long(n)`
#: (a present `["null", ...]` value's branch and length) for 0 <= n < LENGTHS_TABLE
LENGTHS, UNION1_LENGTHS, LENGTHS_TABLE = _SMALL, _UNION1_SMALL, _TABLE
# A timestamp-micros between 1978 and 3111 is a non-negative long whose zig-zag value z = 2n has 50 to 56
# bits: exactly 8 varint bytes, written as four 14-bit groups (tables of 2-byte pieces, the last without
# the continuation bit) and read back as four little-endian 16-bit words.
_Z8_LOW, _Z8_HIGH = 1 << 49, 1 << 56
_GROUP = [bytes((x & 0x7F | 0x80, x >> 7 | 0x80)) for x in range(1 << 14)]
_LAST_GROUP = [bytes((x & 0x7F | 0x80, x >> 7)) for x in range(1 << 14)]


def write_long(n: int) -> bytes:
    """`varint(n)`, from tables for small values and for 8-byte ones (timestamp-micros of our era)."""
    if 0 <= n < _TABLE:
        return _SMALL[n]
    if -_TABLE < n < 0:
        return _NEG[-n]
    if n > 0 and _Z8_LOW <= (z := n << 1) < _Z8_HIGH:
        return _GROUP[z & 16383] + _GROUP[z >> 14 & 16383] + _GROUP[z >> 28 & 16383] + _LAST_GROUP[z >> 42]
    return varint(n)


def read_long(data: bytes, pos: int) -> tuple[int, int]:
    """The long starting at `data[pos]` and the position after it (IndexError when truncated)."""
    b = data[pos]
    n = b & 0x7F
    shift = 7
    pos += 1
    while b & 0x80:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    if n >> 64:
        raise ValueError("varint beyond 64 bits")
    return (n >> 1) ^ -(n & 1), pos


def _check_int(n: Any, low: int = _MIN_INT, high: int = _MAX_INT) -> int:
    # what fastavro's union branch validation accepts as an int/long
    if isinstance(n, bool) or not isinstance(n, int) or not low <= n <= high:
        raise TypeError(f"not an Avro int/long: {n!r}")
    return n


def _check_double(x: Any) -> Any:
    if x.__class__ is not float and x.__class__ is not int:
        raise TypeError(f"not a plain float: {x!r}")
    return x


def _check_bool(x: Any) -> bool:
    if x is not True and x is not False:
        raise TypeError(f"not a bool: {x!r}")
    return x


def _check_bytes(x: Any) -> Any:
    if x.__class__ is not bytes and x.__class__ is not bytearray:
        raise TypeError(f"not bytes: {x!r}")
    return x


class _Names:
    """Named types of one schema by full name, as fastavro resolves them."""

    def __init__(self) -> None:
        self.types: dict[str, tuple[dict[str, Any], str | None]] = {}

    def full_name(self, node: dict[str, Any], namespace: str | None) -> tuple[str, str | None]:
        name = node["name"]
        if "." in name:
            return name, name.rsplit(".", 1)[0]
        ns = node.get("namespace", namespace) or None
        return (f"{ns}.{name}" if ns else name), ns

    def resolve(self, ref: str, namespace: str | None) -> tuple[dict[str, Any], str | None]:
        """A referenced type's definition and its own namespace."""
        for candidate in ((f"{namespace}.{ref}" if namespace and "." not in ref else ref), ref):
            if candidate in self.types:
                return self.types[candidate]
        raise Unsupported(f"unknown named type {ref}")


class _Source:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self._counter = 0

    def var(self, prefix: str = "v") -> str:
        self._counter += 1
        return f"{prefix}{self._counter}"

    def const(self, value: Any, prefix: str = "K") -> str:
        for name, existing in self.consts.items():
            if existing is value or (type(existing) is type(value) and existing == value):
                return name
        name = self.var(prefix)
        self.consts[name] = value
        return name

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)

    def build(self, name: str, header: str) -> Callable[..., Any]:
        text = "\n".join([header, *self.lines])
        namespace: dict[str, Any] = dict(self.consts)
        exec(compile(text, f"<avro {name}>", "exec"), namespace)  # generated from a schema
        fn: Callable[..., Any] = namespace[name]
        fn.__source__ = text  # type: ignore[attr-defined]
        return fn


def _kind(schema: Any) -> tuple[str, str | None]:
    """(type, logicalType) of a non-union, non-reference node."""
    if isinstance(schema, str):
        return schema, None
    return schema["type"], schema.get("logicalType")


def _union_parts(schema: list[Any]) -> tuple[int, Any]:
    if len(schema) != 2 or sum(1 for b in schema if b == "null") != 1:
        raise Unsupported(f"union {schema!r}: only null plus one type is compiled")
    null_index = schema.index("null")
    other = schema[1 - null_index]
    if isinstance(other, list):
        raise Unsupported("nested union")
    return null_index, other


# ------------------------------------------------------------------------------------------------ shared


class _Gen:
    """Walks a schema in document order (so named types are defined before they are referenced).

    `cache_timestamps`: keep the timestamps already seen in a record in a per-call dict, worth it when a
    record repeats them (message state: a step's `sentAt` is also in its `history`): by object identity
    when writing, by their 8 encoded bytes when reading (a varint is prefix-free, so equal bytes at a new
    position are the same complete value). By default on when timestamps sit in arrays or there are more
    than four of them.
    """

    def __init__(self, schema: Any, cache_timestamps: bool | None) -> None:
        self.src = _Source()
        self.names = _Names()
        self.stack: list[str] = []
        if cache_timestamps is None:
            count, in_arrays = _count_timestamps(schema)
            cache_timestamps = in_arrays or count > 4
        self.cache = cache_timestamps

    def node(self, schema: Any, ns: str | None) -> tuple[Any, str, str | None, str | None]:
        """(definition, type, logicalType, namespace for children) of a non-union node."""
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return schema, schema, None, ns
            schema, own_ns = self.names.resolve(schema, ns)
            return schema, schema["type"], None, own_ns
        kind = schema["type"]
        if isinstance(kind, (dict, list)) or (
            kind not in _PRIMITIVES and kind not in (*_NAMED, "array", "map")
        ):
            return self.node(kind, ns)
        logical = schema.get("logicalType")
        if logical is not None and (kind, logical) not in (("long", "timestamp-micros"), ("string", "uuid")):
            raise Unsupported(f"logical type {logical} on {kind}")
        if kind in _NAMED:
            if kind == "fixed":
                raise Unsupported("fixed")
            full, ns = self.names.full_name(schema, ns)
            self.names.types.setdefault(full, (schema, ns))
        return schema, kind, logical, ns

    def enter(self, schema: dict[str, Any], ns: str | None) -> None:
        full, _ = self.names.full_name(schema, ns)
        if full in self.stack:
            raise Unsupported(f"recursive record {full}")
        self.stack.append(full)


# ------------------------------------------------------------------------------------------------ writer


class _WriterGen(_Gen):
    def __init__(self, schema: Any, cache_timestamps: bool | None) -> None:
        super().__init__(schema, cache_timestamps)
        self.attributes: dict[str, Mapping[str, str]] = {}
        self.read: set[str] = set()

    def value(self, schema: Any, v: str, ind: int, ns: str | None, checked: bool) -> None:
        """Emit code appending the encoding of local `v`; `checked`: validate like a union branch."""
        src, emit = self.src, self.src.emit
        if isinstance(schema, list):
            null_index, other = _union_parts(schema)
            emit(ind, f"if {v} is None:")
            emit(ind + 1, f"buf += {src.const(varint(null_index))}")
            emit(ind, "else:")
            if null_index == 0 and self.node(other, ns)[1] == "string":
                self.string(v, ind + 1, "_UNION1_SMALL", "b'\\x02' + write_long")
            else:
                emit(ind + 1, f"buf += {src.const(varint(1 - null_index))}")
                self.value(other, v, ind + 1, ns, checked=True)
            return
        schema, kind, logical, ns = self.node(schema, ns)
        if kind == "null":
            emit(ind, f"if {v} is not None: raise TypeError('null expected')")
        elif kind == "boolean":
            emit(ind, f"buf += b'\\x01' if {'_check_bool(' + v + ')' if checked else v} else b'\\x00'")
        elif kind in ("int", "long") and logical is None:
            check = {"int": "_check_int", "long": "_check_long"}[kind]
            emit(ind, f"buf += write_long({check}({v}))" if checked else f"buf += write_long({v})")
        elif kind == "long":  # timestamp-micros
            self.timestamp(v, ind)
        elif kind == "string":  # uuid too: a UUID object has no .encode and goes to fastavro
            self.string(v, ind, "_SMALL", "write_long")
        elif kind == "bytes":
            b = src.var("b")
            emit(ind, f"{b} = _check_bytes({v})")
            emit(ind, f"buf += write_long(len({b}))")
            emit(ind, f"buf += {b}")
        elif kind in ("double", "float"):
            pack = "_pack_double" if kind == "double" else "_pack_float"
            emit(ind, f"buf += {pack}(_check_double({v}))" if checked else f"buf += {pack}({v})")
        elif kind == "enum":
            symbols = src.const({s: varint(i) for i, s in enumerate(schema["symbols"])}, "E")
            emit(ind, f"buf += {symbols}[{v}]")
        elif kind == "array":
            item = src.var("i")
            emit(ind, f"if len({v}):")
            emit(ind + 1, f"buf += write_long(len({v}))")
            emit(ind + 1, f"for {item} in {v}:")
            self.value(schema["items"], item, ind + 2, ns, checked)
            emit(ind, "buf += b'\\x00'")
        elif kind == "map":
            key, val = src.var("k"), src.var("x")
            emit(ind, f"if len({v}):")
            emit(ind + 1, f"buf += write_long(len({v}))")
            emit(ind + 1, f"for {key}, {val} in {v}.items():")
            self.string(key, ind + 2, "_SMALL", "write_long")
            self.value(schema["values"], val, ind + 2, ns, checked)
            emit(ind, "buf += b'\\x00'")
        elif kind == "record":
            self.enter(schema, ns)
            full = self.stack[-1]
            attributes = self.attributes.get(full)
            if attributes is not None:
                missing = [f["name"] for f in schema["fields"] if f["name"] not in attributes]
                if missing:
                    raise Unsupported(f"{full}: no attribute for fields {missing}")
                self.read.add(full)
            for f in schema["fields"]:
                fv = src.var()
                if attributes is None:
                    emit(ind, f"{fv} = {v}[{f['name']!r}]")
                else:
                    emit(ind, f"{fv} = {v}.{attributes[f['name']]}")
                self.value(f["type"], fv, ind, ns, checked)
            self.stack.pop()
        else:
            raise Unsupported(f"type {kind}")

    def string(self, v: str, ind: int, table: str, compute: str) -> None:
        b, n = self.src.var("b"), self.src.var("n")
        self.src.emit(ind, f"{b} = {v}.encode()")
        self.src.emit(ind, f"{n} = len({b})")
        self.src.emit(ind, f"buf += {table}[{n}] if {n} < {_TABLE} else {compute}({n})")
        self.src.emit(ind, f"buf += {b}")

    def timestamp(self, v: str, ind: int) -> None:
        # aware datetimes only: an int, a naive datetime or anything else raises (fastavro decides)
        emit = self.src.emit
        if self.cache:
            k, hit = self.src.var("k"), self.src.var("h")
            emit(ind, f"{k} = id({v})")
            emit(ind, f"{hit} = seen.get({k})")
            emit(ind, f"if {hit} is not None:")
            emit(ind + 1, f"buf += {hit}")
            emit(ind, "else:")
            ind += 1
            emit(ind, f"keep.append({v})")  # the id stays valid while the object lives
            emit(ind, "start = len(buf)")
        z = self.src.var("z")
        emit(ind, f"{z} = (({v} - EPOCH) // ONE_MICROSECOND) << 1")
        emit(ind, f"if {_Z8_LOW} <= {z} < {_Z8_HIGH}:")
        emit(ind + 1, f"buf += _GROUP[{z} & 16383]")
        emit(ind + 1, f"buf += _GROUP[{z} >> 14 & 16383]")
        emit(ind + 1, f"buf += _GROUP[{z} >> 28 & 16383]")
        emit(ind + 1, f"buf += _LAST_GROUP[{z} >> 42]")
        emit(ind, "else:")
        emit(ind + 1, f"buf += varint({z} >> 1)")
        if self.cache:
            emit(ind, f"seen[{k}] = bytes(buf[start:])")


def _count_timestamps(schema: Any, in_array: bool = False) -> tuple[int, bool]:
    """(number of timestamp-micros nodes, whether any is inside an array or map) of a schema's JSON."""
    count, nested = 0, False
    if isinstance(schema, list):
        for branch in schema:
            c, n = _count_timestamps(branch, in_array)
            count, nested = count + c, nested or n
    elif isinstance(schema, dict):
        if schema.get("logicalType") == "timestamp-micros":
            return 1, in_array
        for key in ("type", "items", "values"):
            if isinstance(schema.get(key), (dict, list)):
                c, n = _count_timestamps(schema[key], in_array or key in ("items", "values"))
                count, nested = count + c, nested or n
        for f in schema.get("fields", ()):
            c, n = _count_timestamps(f["type"], in_array)
            count, nested = count + c, nested or n
    return count, nested


def compile_writer(
    schema: Any, cache_timestamps: bool | None = None, build: Mapping[str, Build] | None = None
) -> Writer:
    """`write(record, buf)`: append the Avro binary encoding of `record` (see the module contract).

    `build` (the same mapping as `compile_reader`'s): those records are read from objects, field by
    attribute (`obj.keyword`), instead of from dicts; the bytes are those of the equivalent dict."""
    if not (isinstance(schema, dict) and schema.get("type") == "record"):
        raise Unsupported("top-level schema must be a record")
    gen = _WriterGen(schema, cache_timestamps)
    gen.attributes = {name: keywords for name, (_, keywords) in (build or {}).items()}
    gen.src.consts.update(
        EPOCH=EPOCH,
        ONE_MICROSECOND=ONE_MICROSECOND,
        varint=varint,
        write_long=write_long,
        _SMALL=_SMALL,
        _UNION1_SMALL=_UNION1_SMALL,
        _GROUP=_GROUP,
        _LAST_GROUP=_LAST_GROUP,
        _check_int=_check_int,
        _check_long=lambda n: _check_int(n, _MIN_LONG, _MAX_LONG),
        _check_double=_check_double,
        _check_bool=_check_bool,
        _check_bytes=_check_bytes,
        _pack_double=struct.Struct("<d").pack,
        _pack_float=struct.Struct("<f").pack,
    )
    if gen.cache:
        gen.src.emit(1, "seen = {}")
        gen.src.emit(1, "keep = []")
    gen.value(schema, "record", 1, None, checked=False)
    if set(gen.attributes) - gen.read:
        raise Unsupported(f"no such records to read: {sorted(set(gen.attributes) - gen.read)}")
    return gen.src.build("write", "def write(record, buf):")  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ reader

# first byte of a length -> the length, or -1 when it takes more bytes (or is negative)
_LENGTH = [b >> 1 if b < 0x80 and not b & 1 else -1 for b in range(256)]


def _read_length(data: bytes, pos: int) -> tuple[int, int]:
    n, pos = read_long(data, pos)
    if n < 0:
        raise ValueError(f"negative length {n}")
    return n, pos


class _ReaderGen(_Gen):
    build: dict[str, Build]

    def __init__(self, schema: Any, cache_timestamps: bool | None) -> None:
        super().__init__(schema, cache_timestamps)
        self.build = {}
        self.built: set[str] = set()

    def value(self, schema: Any, t: str, ind: int, ns: str | None) -> None:
        """Emit code reading one value at `pos` into local `t`, advancing `pos`."""
        src, emit = self.src, self.src.emit
        if isinstance(schema, list):
            null_index, other = _union_parts(schema)
            b = src.var("u")
            emit(ind, f"{b} = data[pos]")
            emit(ind, f"if {b} == {varint(null_index)[0]}:")
            emit(ind + 1, f"{t} = None")
            emit(ind + 1, "pos += 1")
            emit(ind, f"elif {b} == {varint(1 - null_index)[0]}:")
            emit(ind + 1, "pos += 1")
            self.value(other, t, ind + 1, ns)
            emit(ind, "else:")
            emit(ind + 1, f"raise ValueError('union index byte %d' % {b})")
            return
        schema, kind, logical, ns = self.node(schema, ns)
        if kind == "null":
            emit(ind, f"{t} = None")
        elif kind == "boolean":
            emit(ind, f"{t} = data[pos] != 0")
            emit(ind, "pos += 1")
        elif kind in ("int", "long") and logical is None:
            b = src.var("b")
            emit(ind, f"{b} = data[pos]")
            emit(ind, f"if {b} < 128:")
            emit(ind + 1, f"{t} = ({b} >> 1) ^ -({b} & 1)")
            emit(ind + 1, "pos += 1")
            emit(ind, "else:")
            emit(ind + 1, f"{t}, pos = read_long(data, pos)")
        elif kind == "long":  # timestamp-micros
            self.timestamp(t, ind)
        elif kind in ("string", "bytes"):
            n, end = src.var("n"), src.var("e")
            emit(ind, f"{n} = _LENGTH[data[pos]]")
            emit(ind, f"if {n} >= 0:")
            emit(ind + 1, "pos += 1")
            emit(ind, "else:")
            emit(ind + 1, f"{n}, pos = _read_length(data, pos)")
            emit(ind, f"{end} = pos + {n}")
            if kind == "bytes":
                emit(ind, f"{t} = data[pos:{end}]")
            elif logical == "uuid":
                emit(ind, f"{t} = UUID(data[pos:{end}].decode())")
            else:
                emit(ind, f"{t} = data[pos:{end}].decode()")
            emit(ind, f"pos = {end}")
        elif kind in ("double", "float"):
            unpack = "_unpack_double" if kind == "double" else "_unpack_float"
            emit(ind, f"{t} = {unpack}(data, pos)[0]")
            emit(ind, f"pos += {8 if kind == 'double' else 4}")
        elif kind == "enum":
            i = src.var("i")
            symbols = src.const(tuple(schema["symbols"]), "S")
            emit(ind, f"{i}, pos = read_long(data, pos)")
            emit(ind, f"if {i} < 0: raise ValueError('enum index')")
            emit(ind, f"{t} = {symbols}[{i}]")
        elif kind in ("array", "map"):
            count, item, key = src.var("c"), src.var("i"), src.var("k")
            emit(ind, f"{t} = {'[]' if kind == 'array' else '{}'}")
            emit(ind, f"{count}, pos = read_long(data, pos)")
            emit(ind, f"while {count}:")
            emit(ind + 1, f"if {count} < 0:")
            emit(ind + 2, f"{count} = -{count}")
            emit(ind + 2, "_, pos = read_long(data, pos)")
            emit(ind + 1, f"for _ in range({count}):")
            if kind == "array":
                self.value(schema["items"], item, ind + 2, ns)
                emit(ind + 2, f"{t}.append({item})")
            else:
                self.value("string", key, ind + 2, ns)
                self.value(schema["values"], item, ind + 2, ns)
                emit(ind + 2, f"{t}[{key}] = {item}")
            emit(ind + 1, f"{count}, pos = read_long(data, pos)")
        elif kind == "record":
            self.enter(schema, ns)
            full = self.stack[-1]
            values = []
            arrays = set()
            for f in schema["fields"]:
                fv = src.var()
                self.value(f["type"], fv, ind, ns)
                values.append((f["name"], fv))
                if isinstance(f["type"], dict) and f["type"].get("type") == "array":
                    arrays.add(f["name"])
            self.stack.pop()
            built = self.build.get(full)
            if built is None:
                emit(ind, f"{t} = {{{', '.join(f'{name!r}: {fv}' for name, fv in values)}}}")
            else:
                ctor, keywords = built
                missing = [name for name, _ in values if name not in keywords]
                if missing:
                    raise Unsupported(f"{full}: no keyword for fields {missing}")
                self.built.add(full)
                args = ", ".join(
                    f"{keywords[name]}={f'tuple({fv})' if name in arrays else fv}" for name, fv in values
                )
                emit(ind, f"{t} = {src.const(ctor, 'C')}({args})")
        else:
            raise Unsupported(f"type {kind}")

    def timestamp(self, t: str, ind: int) -> None:
        emit = self.src.emit
        if self.cache:
            k = self.src.var("k")
            emit(ind, f"{k} = data[pos:pos + 8]")
            emit(ind, f"{t} = seen.get({k})")
            emit(ind, f"if {t} is not None:")
            emit(ind + 1, "pos += 8")
            emit(ind, "else:")
            ind += 1
        a, b, c, d = (self.src.var(x) for x in "abcd")
        emit(ind, f"{a}, {b}, {c}, {d} = _words(data, pos) if pos + 8 <= len(data) else _NO_WORDS")
        emit(ind, f"if {a} & {b} & {c} & 0x8080 == 0x8080 and {d} & 0x8080 == 0x80:")
        emit(
            ind + 1,
            f"{t} = ({a} & 127 | {a} >> 1 & 0x3F80 | ({b} & 127 | {b} >> 1 & 0x3F80) << 14)"
            f" | ({c} & 127 | {c} >> 1 & 0x3F80 | ({d} & 127 | {d} >> 1 & 0x3F80) << 14) << 28",
        )
        emit(ind + 1, f"{t} = EPOCH + timedelta(0, 0, ({t} >> 1) ^ -({t} & 1))")
        if self.cache:
            emit(ind + 1, f"seen[{k}] = {t}")
        emit(ind + 1, "pos += 8")
        emit(ind, "else:")
        emit(ind + 1, f"{t}, pos = read_long(data, pos)")
        emit(ind + 1, f"{t} = EPOCH + timedelta(0, 0, {t})")


def compile_reader(
    schema: Any, cache_timestamps: bool | None = None, build: Mapping[str, Build] | None = None
) -> Reader:
    """`read(data, pos) -> (record, end)`: decode a record written with `schema` (the module contract).

    `build`: record full name -> (constructor, {Avro field name: keyword}); those records are returned
    as `constructor(keyword=value, ...)` instead of dicts (the other records inside stay dicts), which
    saves building a dict only to map it to an object. Their array fields are passed as tuples (the
    objects are frozen). Every field of such a record must have a keyword,
    and every name must be a record of the schema, else `Unsupported`."""
    if not (isinstance(schema, dict) and schema.get("type") == "record"):
        raise Unsupported("top-level schema must be a record")
    gen = _ReaderGen(schema, cache_timestamps)
    gen.build = dict(build or {})
    gen.src.consts.update(
        _words=struct.Struct("<4H").unpack_from,
        _NO_WORDS=(0, 0, 0, 0),
        EPOCH=EPOCH,
        timedelta=timedelta,
        UUID=uuid.UUID,
        read_long=read_long,
        _LENGTH=_LENGTH,
        _read_length=_read_length,
        _unpack_double=struct.Struct("<d").unpack_from,
        _unpack_float=struct.Struct("<f").unpack_from,
    )
    if gen.cache:
        gen.src.emit(1, "seen = {}")
    gen.value(schema, "record", 1, None)
    if set(gen.build) - gen.built:
        raise Unsupported(f"no such records to build: {sorted(set(gen.build) - gen.built)}")
    gen.src.emit(1, "if pos > len(data):")
    gen.src.emit(2, "raise EOFError('truncated record')")
    gen.src.emit(1, "return record, pos")
    return gen.src.build("read", "def read(data, pos):")  # type: ignore[return-value]
