"""mmref.renderers: the image-ref contract, the image store, layout math and chat rendering."""

from mmref.renderers.contract import make_ref, verify_ref
from mmref.renderers.errors import (
    AssetNotFoundError,
    ContractMismatchError,
    IntegrityError,
    InvalidImageError,
    LayoutError,
    MMRefError,
    PathEscapeError,
    RefError,
    RenderError,
    StoreError,
)
from mmref.renderers.layout import DEFAULT_SPECS, ImageLayout, LayoutSpec, describe_image, layout_spec
from mmref.renderers.refs import CONTRACT_VERSION, FAMILIES, ImageSlot, RawImageRef, encode_ref, parse_ref
from mmref.renderers.store import ImageStore, StoredImage, StoreLimits

__all__ = [
    "AssetNotFoundError", "CONTRACT_VERSION", "ContractMismatchError", "DEFAULT_SPECS", "FAMILIES", "ImageLayout",
    "ImageSlot", "ImageStore", "IntegrityError", "InvalidImageError", "LayoutError", "LayoutSpec", "MMRefError",
    "PathEscapeError", "RawImageRef", "RefError", "RenderError", "StoreError", "StoreLimits", "StoredImage",
    "describe_image", "encode_ref", "layout_spec", "make_ref", "parse_ref", "verify_ref",
]
