"""The frame bus: ZeroMQ transport (:mod:`.transport`), its one versioned
message format (:mod:`.protocol`) and a minimal consumer (:mod:`.tap`).

Data path: capture -> **bus** -> denoise -> stitch.
"""
