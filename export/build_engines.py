"""``python export/build_engines.py``: run the engine export from a checkout.

The exporter itself lives in the package (``obclip.export.build_engines``, also
``python -m obclip.export.build_engines`` from an installed obclip); this file
only keeps the command the project has always documented.
"""

from obclip.export.build_engines import main

if __name__ == "__main__":
    raise SystemExit(main())
