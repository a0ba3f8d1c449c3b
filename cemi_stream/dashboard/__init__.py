"""The live web dashboard, served by the daemon: pages, mosaic tiles and the run event feed.

* :mod:`~cemi_stream.dashboard.tiles` - deep-zoom tiles rendered from the
  OME-Zarr mosaic on disk, versioned by the chunk files they cover;
* :mod:`~cemi_stream.dashboard.feed` - per-run numbered events (snapshot,
  run, stats, frames, tiles, alerts) with resume after a reconnect;
* :mod:`~cemi_stream.dashboard.routes` - the HTTP endpoints, mounted on the
  daemon's API application (:func:`cemi_stream.daemon.api.create_app`);
* ``static/`` - the pages (plain HTML, CSS and JavaScript, no build step)
  and the vendored OpenSeadragon viewer (``static/vendor/openseadragon``).
"""
