"""Start the browser GUI (trame-slicer) and print the address to open, with this start's token in it.

Slicer's axial, coronal, sagittal and 3D views in a web page, with a Segment Pancreas button, the attention
heatmap and downloads. The server listens on the loopback interface (127.0.0.1) by default, so only this
machine can open the page; reach a remote machine through an SSH tunnel (ssh -L 8080:127.0.0.1:8080 HOST).
Only the address printed at start opens the page: it holds a token made at each start. The page loads by path
only inside --data-dir. Without TLS, --host beyond loopback sends the token and the images across the network
in clear.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from AttentionUNetSegLib.cli import add_model_arguments
from AttentionUNetSegLib.errors import UserError

from .upload import DEFAULT_MAX_UPLOAD_MB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "input", nargs="?", type=Path, metavar="INPUT", help="CT to show at start: image file or DICOM series folder"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1, loopback: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    parser.add_argument(
        "--data-dir", type=Path, default=Path("."), metavar="FOLDER",
        help="the page loads CTs by path only inside this folder (default: the current folder)",
    )
    parser.add_argument(
        "--max-upload-mb", type=_positive_int, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
        help=f"largest upload from the page, in MiB (default: {DEFAULT_MAX_UPLOAD_MB})",
    )
    add_model_arguments(parser, progress=False)


def run(args: argparse.Namespace) -> int:
    from AttentionUNetSegLib.cli import load_segmenter

    data_dir = _data_dir(args.data_dir)
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # offscreen views, no X server
    webapp = _web_app_module()
    loopback = webapp.guard.is_loopback(args.host)
    if not loopback:
        print(_beyond_loopback_warning(args.host, args.port), file=sys.stderr, flush=True)
    segmenter = load_segmenter(args)
    image = webapp.read_ct(args.input) if args.input else None

    app = webapp.PancreasWebApp(segmenter, data_dir=data_dir, max_upload_bytes=args.max_upload_mb * 2**20)
    if image is not None:
        app.show_initial_ct(image, webapp.display_name(args.input))
    token = secrets.token_urlsafe(32)  # a new one at each start, as Jupyter does
    webapp.guard.protect(app.server, token, loopback)
    # trame parses sys.argv itself (it would take INPUT and our options for its own): give it its own arguments.
    os.environ["TRAME_ARGS"] = "--server"
    app.server.controller.on_server_ready.add(
        lambda **_: print(
            f"AttentionUNetSeg web app: http://{args.host}:{app.server.port}/?secret={token} (Ctrl+C stops it)",
            flush=True,
        )
    )
    try:
        app.server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=False, timeout=0)
    except OSError as error:
        raise UserError(
            f"cannot listen on {args.host}:{args.port}", error.strerror or str(error),
            "choose another --port, or an address of this machine for --host",
        ) from None
    return 0


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of MiB above 0")
    return int(text)


def _data_dir(folder: Path) -> Path:
    if not folder.is_dir():
        raise UserError(f"--data-dir {folder} is not a folder", "the page loads CTs by path only inside it",
                        "give an existing folder")
    return folder.resolve()


def _beyond_loopback_warning(host: str, port: int) -> str:
    return (
        f"warning: --host {host} opens the server beyond this machine: whoever reaches port {port} with the "
        "printed address (its token) can load, segment and download CTs, and without TLS the token and the "
        f"images cross the network in clear; prefer the default 127.0.0.1 and an SSH tunnel "
        f"(ssh -L {port}:127.0.0.1:{port} SERVER)"
    )


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
