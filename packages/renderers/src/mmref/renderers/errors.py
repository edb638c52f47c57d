"""Errors raised by mmref.renderers.

Every error names the value that was wrong, what was expected, and where it came from.
Each also subclasses the built-in type a caller would reach for (``ValueError``,
``FileNotFoundError``), so ordinary ``except`` clauses keep working::

    MMRefError
     ├── RefError (ValueError)            a ref string or payload breaks the contract
     ├── ContractMismatchError (ValueError) a ref disagrees with the consumer's own config
     ├── LayoutError (ValueError)         an image size the layout math cannot place
     ├── RenderError (ValueError)         messages a renderer cannot turn into tokens
     ├── SlotError (ValueError)           image slots that are not exactly a sequence's image-pad runs
     └── StoreError
          ├── InvalidImageError (ValueError)     bad data URL, media type, corrupt/oversized image
          ├── AssetNotFoundError (FileNotFoundError)
          ├── IntegrityError                     stored bytes do not hash to the ref's sha256
          └── PathEscapeError (PermissionError)  an asset resolves outside the store root
"""

from __future__ import annotations


class MMRefError(Exception):
    """Base of every mmref error."""


class RefError(MMRefError, ValueError):
    """A ref string or payload that breaks the image-ref contract."""


class ContractMismatchError(MMRefError, ValueError):
    """A ref that is well formed but disagrees with the consumer's configuration."""


class LayoutError(MMRefError, ValueError):
    """An image size that the layout math cannot place (non-positive, extreme aspect)."""


class RenderError(MMRefError, ValueError):
    """Messages that a renderer cannot turn into token ids."""


class SlotError(MMRefError, ValueError):
    """Image slots that do not lie exactly on a token sequence's image-pad runs (``refs.check_slots``)."""


class StoreError(MMRefError):
    """Base of image-store errors."""


class InvalidImageError(StoreError, ValueError):
    """Image bytes or a data URL that the store refuses to hold."""


class AssetNotFoundError(StoreError, FileNotFoundError):
    """A ref whose asset is not in this process's store."""


class IntegrityError(StoreError):
    """Stored bytes that do not hash to the ref's sha256 (tampered or corrupt file)."""


class PathEscapeError(StoreError, PermissionError):
    """An asset that resolves outside the store root (``..``, absolute, symlink out)."""


class StoreWriteError(StoreError, OSError):
    """An asset could not be written (disk full, permissions, a failed rename); nothing partial is left."""
