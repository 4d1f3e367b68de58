from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RenderRequest(_message.Message):
    __slots__ = ("avatar_id", "attributes", "expression", "yaw", "pitch", "width", "height", "latent")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ExpressionEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    YAW_FIELD_NUMBER: _ClassVar[int]
    PITCH_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    avatar_id: str
    attributes: _containers.ScalarMap[str, float]
    expression: _containers.ScalarMap[str, float]
    yaw: float
    pitch: float
    width: int
    height: int
    latent: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, avatar_id: _Optional[str] = ..., attributes: _Optional[_Mapping[str, float]] = ..., expression: _Optional[_Mapping[str, float]] = ..., yaw: _Optional[float] = ..., pitch: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., latent: _Optional[_Iterable[float]] = ...) -> None: ...

class RenderReply(_message.Message):
    __slots__ = ("png", "width", "height")
    PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    width: int
    height: int
    def __init__(self, png: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ListAvatarsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class Attribute(_message.Message):
    __slots__ = ("name", "edit_labels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EDIT_LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    edit_labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., edit_labels: _Optional[_Iterable[str]] = ...) -> None: ...

class AvatarInfo(_message.Message):
    __slots__ = ("id", "version", "attributes", "expressions")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    EXPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: str
    attributes: _containers.RepeatedCompositeFieldContainer[Attribute]
    expressions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., version: _Optional[str] = ..., attributes: _Optional[_Iterable[_Union[Attribute, _Mapping]]] = ..., expressions: _Optional[_Iterable[str]] = ...) -> None: ...

class ListAvatarsReply(_message.Message):
    __slots__ = ("avatars", "next_page_token")
    AVATARS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    avatars: _containers.RepeatedCompositeFieldContainer[AvatarInfo]
    next_page_token: str
    def __init__(self, avatars: _Optional[_Iterable[_Union[AvatarInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
