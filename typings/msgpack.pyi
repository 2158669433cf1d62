# The part of msgpack's API dmodel uses (msgpack ships no type information).
from collections.abc import Callable
from typing import Any

class UnpackException(Exception): ...
class UnpackValueError(UnpackException, ValueError): ...
class ExtraData(UnpackValueError): ...
class FormatError(ValueError, UnpackException): ...
class StackError(ValueError, UnpackException): ...

def packb(
    o: object, *, default: Callable[[Any], object] | None = ..., use_bin_type: bool = ...,
    strict_types: bool = ..., use_single_float: bool = ..., datetime: bool = ...,
    unicode_errors: str | None = ...,
) -> bytes: ...

# Decoded data is whatever the bytes say: callers check its shape.
def unpackb(
    packed: bytes | bytearray | memoryview, *, raw: bool = ..., use_list: bool = ...,
    strict_map_key: bool = ..., max_buffer_size: int = ..., max_str_len: int = ...,
    max_bin_len: int = ..., max_array_len: int = ..., max_map_len: int = ...,
    max_ext_len: int = ..., timestamp: int = ..., unicode_errors: str | None = ...,
    object_hook: Callable[[dict[Any, Any]], object] | None = ...,
    list_hook: Callable[[list[Any]], object] | None = ...,
    ext_hook: Callable[[int, bytes], object] | None = ...,
) -> Any: ...

class Packer:
    def __init__(
        self, *, default: Callable[[Any], object] | None = ..., use_bin_type: bool = ...,
        strict_types: bool = ..., use_single_float: bool = ..., autoreset: bool = ...,
    ) -> None: ...
    def pack(self, obj: object) -> bytes: ...
