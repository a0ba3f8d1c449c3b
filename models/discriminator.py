"""U-Net discriminator with spectral normalisation (Real-ESRGAN's, for SEMGAN).

It gives one real/fake logit per pixel, which suits SEM images whose texture
varies across the frame.  Layer names are Real-ESRGAN's (``conv0`` ..
``conv9``); spectral norm is the classic ``torch.nn.utils.spectral_norm`` hook,
so the parameters are ``convN.weight_orig`` with buffers ``weight_u`` /
``weight_v``, as in Real-ESRGAN discriminator checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import spectral_norm

from cemi_stream.errors import ModelError

_LRELU_SLOPE = 0.2
#: Input height and width must be multiples of this (three stride-2 stages).
SIZE_MULTIPLE = 8


def _sn_conv(in_ch: int, out_ch: int, kernel: int, stride: int) -> nn.Module:
    # No bias: spectral norm bounds the weight, a bias would add an unbounded offset.
    return spectral_norm(nn.Conv2d(in_ch, out_ch, kernel, stride, 1, bias=False))


class UNetDiscriminatorSN(nn.Module):
    """Per-pixel real/fake discriminator.

    Parameters
    ----------
    num_in_ch : int
        Image channels (1 for SEM grey images).
    num_feat : int
        Channels of the first stage; the deeper stages use 2x, 4x, 8x.
    skip_connection : bool
        Add the encoder features to the decoder features of the same size.

    Notes
    -----
    ``forward`` maps ``(N, num_in_ch, H, W)`` to logits ``(N, 1, H, W)``; H and
    W must be multiples of 8, else :class:`~cemi_stream.errors.ModelError`.
    """

    def __init__(
        self, num_in_ch: int = 1, num_feat: int = 64, skip_connection: bool = True
    ) -> None:
        super().__init__()
        nf = num_feat
        self.num_in_ch = num_in_ch
        self.num_feat = num_feat
        self.skip_connection = skip_connection
        self.conv0 = nn.Conv2d(num_in_ch, nf, 3, 1, 1)
        # encoder: 4x4 stride-2 downsampling
        self.conv1 = _sn_conv(nf, nf * 2, 4, 2)
        self.conv2 = _sn_conv(nf * 2, nf * 4, 4, 2)
        self.conv3 = _sn_conv(nf * 4, nf * 8, 4, 2)
        # decoder: bilinear x2 then 3x3
        self.conv4 = _sn_conv(nf * 8, nf * 4, 3, 1)
        self.conv5 = _sn_conv(nf * 4, nf * 2, 3, 1)
        self.conv6 = _sn_conv(nf * 2, nf, 3, 1)
        self.conv7 = _sn_conv(nf, nf, 3, 1)
        self.conv8 = _sn_conv(nf, nf, 3, 1)
        self.conv9 = nn.Conv2d(nf, 1, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(_LRELU_SLOPE, inplace=False)

    @staticmethod
    def _up(x: Tensor) -> Tensor:
        return nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, 1, H, W)`` for images ``x`` ``(N, num_in_ch, H, W)``."""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            h, w = int(x.shape[-2]), int(x.shape[-1])
            if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
                raise ModelError(
                    f"UNetDiscriminatorSN: input {h}x{w} px (HxW) must have height and "
                    f"width multiples of {SIZE_MULTIPLE}"
                )
        x0 = self.lrelu(self.conv0(x))
        x1 = self.lrelu(self.conv1(x0))
        x2 = self.lrelu(self.conv2(x1))
        x3 = self.lrelu(self.conv3(x2))

        x4 = self.lrelu(self.conv4(self._up(x3)))
        if self.skip_connection:
            x4 = x4 + x2
        x5 = self.lrelu(self.conv5(self._up(x4)))
        if self.skip_connection:
            x5 = x5 + x1
        x6 = self.lrelu(self.conv6(self._up(x5)))
        if self.skip_connection:
            x6 = x6 + x0

        out = self.lrelu(self.conv7(x6))
        out = self.lrelu(self.conv8(out))
        logits: Tensor = self.conv9(out)
        return logits


__all__ = ["SIZE_MULTIPLE", "UNetDiscriminatorSN"]
