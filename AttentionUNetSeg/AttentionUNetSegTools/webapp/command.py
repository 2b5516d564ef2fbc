"""Start the browser GUI (trame-slicer) and print the address to open.

Slicer's axial, coronal, sagittal and 3D views in a web page, with a Segment Pancreas button, the attention
heatmap and downloads. The server listens on the loopback interface (127.0.0.1) by default, so only this
machine can open the page; reach a remote machine through an SSH tunnel (ssh -L 8080:127.0.0.1:8080 HOST).
--host 0.0.0.0 exposes it to the network: anyone who can reach the port can then run the model and open
any image the server's user can read.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from AttentionUNetSegLib.cli import add_model_arguments
from AttentionUNetSegLib.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "input", nargs="?", type=Path, metavar="INPUT", help="CT to show at start: image file or DICOM series folder"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1, loopback: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    add_model_arguments(parser, progress=False)


def run(args: argparse.Namespace) -> int:
    from AttentionUNetSegLib.cli import load_segmenter

    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # offscreen views, no X server
    webapp = _web_app_module()
    segmenter = load_segmenter(args)
    image = webapp.read_ct(args.input) if args.input else None

    app = webapp.PancreasWebApp(segmenter)
    if image is not None:
        app.show_initial_ct(image, webapp.display_name(args.input))
    # trame parses sys.argv itself (it would take INPUT and our options for its own): give it its own arguments.
    os.environ["TRAME_ARGS"] = "--server"
    app.server.controller.on_server_ready.add(
        lambda **_: print(
            f"AttentionUNetSeg web app: http://{args.host}:{app.server.port}/ (Ctrl+C stops it)", flush=True
        )
    )
    try:
        app.server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=False, timeout=0)
    except OSError as error:
        raise UserError(
            f"cannot listen on {args.host}:{args.port}", error.strerror or str(error), "choose another --port"
        ) from None
    return 0


def _web_app_module():
    try:
        from . import app
    except ImportError as error:
        raise UserError(
            "the web app needs trame-slicer",
            f"{error.name or error} is not installed",
            'install it with: pip install "attention-unet-seg[web]"',
        ) from None
    return app
