"""Kimi K2.5's image processor on the PIL backend.

transformers ships Kimi K2.5's image processor only on its torchvision backend
(``Kimi_K25ImageProcessor``); this is the same processing with PIL and NumPy, so every stage
runs without torchvision: navit resize (``mmref.renderers.layout.navit_resize``, checked
against transformers' own ``navit_resize`` by property tests), zero padding on the bottom and
right to a multiple of ``patch_size * merge_size``, rescale and normalize, then patches::

    pixel_values    (sum of h*w over images, 3, patch_size, patch_size) float32
    image_grid_thw  (num_images, 3) int64, (1, h, w) in patches

Its config saves as ``Kimi_K25ImageProcessor`` (the ``Pil`` suffix dropped, as transformers
does for its own PIL processors), so a directory it writes reads as Kimi's elsewhere too.
"""

from __future__ import annotations

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs

from mmref.renderers.layout import layout_spec, navit_resize, navit_scaled_size


class KimiK25ImageKwargs(ImagesKwargs, total=False):
    """``max_patches``: patch budget of one image; ``patch_size``, ``merge_size``: the vision tower's."""

    max_patches: int
    patch_size: int
    merge_size: int


class Kimi_K25ImageProcessorPil(PilBackend):  # noqa: N801 - transformers' naming, so to_dict names Kimi's type
    """Kimi K2.5 image processing without torchvision (defaults: the published checkpoint's)."""

    do_resize = True
    resample = PILImageResampling.BICUBIC
    size = {"max_height": 512, "max_width": 512}
    max_patches = 16384
    do_rescale = True
    do_normalize = True
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    do_convert_rgb = True
    patch_size = 14
    merge_size = 2
    valid_kwargs = KimiK25ImageKwargs
    model_input_names = ["pixel_values", "image_grid_thw"]

    def _preprocess(self, images: list[np.ndarray], do_resize: bool, size: SizeDict,
                    resample: PILImageResampling | None, do_rescale: bool, rescale_factor: float,
                    do_normalize: bool, image_mean: float | list[float] | None, image_std: float | list[float] | None,
                    patch_size: int, merge_size: int, max_patches: int, return_tensors: str | None,
                    **kwargs: object) -> BatchFeature:
        spec = layout_spec("kimi-k2.5", patch_size=patch_size, merge_size=merge_size, in_patch_limit=max_patches,
                           patch_limit_on_one_side=size.max_height)
        all_patches, grids = [], []
        for image in images:  # (C, H, W)
            if do_resize:
                height, width = image.shape[-2:]
                scaled_h, scaled_w = navit_scaled_size(height, width, spec)
                padded_h, padded_w = navit_resize(height, width, spec)
                image = self.resize(image, size=SizeDict(height=scaled_h, width=scaled_w), resample=resample)
                image = self.pad([image], pad_size=SizeDict(height=padded_h, width=padded_w))[0]
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            patches, grid_h, grid_w = _patchify(image, patch_size)
            all_patches.append(patches)
            grids.append([1, grid_h, grid_w])
        return BatchFeature(data={"pixel_values": np.concatenate(all_patches, axis=0).astype(np.float32),
                                  "image_grid_thw": np.array(grids, dtype=np.int64)}, tensor_type=return_tensors)


def _patchify(image: np.ndarray, patch_size: int) -> tuple[np.ndarray, int, int]:
    """(C, H, W) -> (H/p * W/p, C, p, p) in row-major patch order, as Kimi's ``patchify``."""
    channels, height, width = image.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = image.reshape(channels, grid_h, patch_size, grid_w, patch_size).transpose(1, 3, 0, 2, 4)
    return patches.reshape(grid_h * grid_w, channels, patch_size, patch_size), grid_h, grid_w
