"""Pairwise translation between overlapping SEM frames, to sub-pixel accuracy.

The live stitcher's measurement: given two frames that overlap (by as little
as ~5 %), how far apart are they, and can the answer be trusted?

1. **coarse** (:mod:`.coarse`), at reduced resolution over the whole
   frames: band-passed phase correlation; several peaks and their
   wrap-around aliases become candidates, ranked by the NCC of the frames'
   detail images on their overlap;
2. **fine** (:mod:`.fine`), at full resolution on the overlap only: a
   bounded window correlated in the filter's pass band with partial
   whitening, the peak located to sub-pixel precision on the DFT
   interpolation of the correlation;
3. **acceptance** (:mod:`.accept`): noise-normalised NCC, band-passed
   significance and the margin over competing candidates, whose scales do
   not depend on the dose, so that noisy low-definition frames are judged as
   fairly as clean ones; an implausible answer comes back with ``ok=False``
   and a reason rather than as a wrong translation.

:mod:`.types` holds the contracts (configuration, answer, prepared frame),
:mod:`.spectral` the stateless DFT and image helpers, :mod:`.registrar` the
estimator.  Accuracy and speed: ``bench/bench_register.py``; the acceptance
ROC: ``bench/bench_accept.py``.

Convention (as in :mod:`cemi_stream.capture.keyframes`): ``(dx, dy)`` is the top-left
corner of ``mov`` minus that of ``ref`` in shared (mosaic) pixels, so
``mov[y, x]`` shows what ``ref[y + dy, x + dx]`` shows; images are ``(y, x)``.
"""

from .registrar import Registrar
from .types import Prepared, RegisterConfig, RegistrationError, Shift

__all__ = ["Prepared", "RegisterConfig", "Registrar", "RegistrationError", "Shift"]
