"""Neural networks of cemi-stream and their weights.

* :mod:`models.rrdbnet` - the ESRGAN generator (RRDBNet, BasicSR layout) used
  as the SEM denoiser (SEMNET; SEMGAN when trained with a discriminator), its
  named architectures (``paper``, ``compact``), parameter / FLOP counts and
  loading of BasicSR / Real-ESRGAN checkpoints (RGB folded to grey);
* :mod:`models.discriminator` - Real-ESRGAN's U-Net discriminator with
  spectral norm, for adversarial training;
* :mod:`models.weights` - saving / loading a model as safetensors weights plus
  a JSON model card;
* :mod:`models.zoo` - finding a model by name or path; shipped models live in
  ``models/weights/``.

The lamellar segmentation network (U-Net++) is reserved for a later issue.
These modules need the ``ml`` extra (``pip install -e .[ml]``); this package
file imports nothing, so the acquisition front end does not pull in torch.
"""
