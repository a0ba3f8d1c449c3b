"""Neural networks of cemi-stream and their weights.

Reserved for the denoiser (an ESRGAN-style RRDBNet, SEMNET/SEMGAN) and the
lamellar segmentation network (U-Net++); they need the ``ml`` extra
(``pip install -e .[ml]``).  The acquisition front end does not import it.
"""
