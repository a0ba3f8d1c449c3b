"""The capture side: source frames in, kept frames on the spool and the bus.

Per frame, in order: levels (:mod:`.levels`, 16-bit/float to 8-bit with one
window per run), crop (:mod:`.crop`, data bars and borders), fault rejection
(:mod:`.faults`), keyframe selection (:mod:`.keyframes`) — together the front
end (:mod:`.frontend`) — then the raw spool (:mod:`.spool`) and the bus.
:mod:`.stage` is the capture process, :mod:`.extract` writes keyframes to an
image folder instead.

Data path: source -> **capture** -> bus -> denoise -> stitch.
"""
