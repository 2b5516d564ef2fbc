"""The web app against hostile clients: ``attention-unet-seg serve`` on real CT, attacked with a websocket client
that speaks wslink itself (as trame's page does, but sending whatever it likes) and with Debian's chromium
opening a page from another origin.

One server for the module (small upload limit, a data folder with a link out of it and a pipe in it). Its state
is shared by every client, so each test starts from what it finds and checks only what it changed.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import random
import re
import shutil
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import test_webapp
from test_webapp import CONSOLE_SCRIPT, Server, serve

aiohttp = pytest.importorskip("aiohttp", reason="the hostile tests speak websocket with aiohttp")
msgpack = pytest.importorskip("msgpack", reason="wslink's messages are msgpack")

browser = test_webapp.browser  # the same fixture: Debian's chromium, headless
MAX_UPLOAD_MB = 8
FRAME_BYTES = 2**20  # the server's cap on one websocket message (guard.WS_MESSAGE_BYTES)
SLICE_BYTES = 4 * 2**20  # what the page sends per upload message (upload.UPLOAD_SLICE_BYTES)
HEADER = struct.Struct("<III")  # wslink's chunk header: message id, offset, total size
REFUSED_PATH = "no CT at that path"
LOAD_S = 60


@dataclass
class Hostile:
    server: Server
    data: Path  # the server's --data-dir
    tmp: Path  # the server's TMPDIR, where uploads are written

    @property
    def base(self) -> str:
        return re.match(r"http://[^/]+", self.server.url).group(0)

    @property
    def token(self) -> str:
        return re.search(r"secret=([\w-]+)", self.server.url).group(1)

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.server.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


@pytest.fixture(scope="module")
def hostile(small_ct, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data, tmp = root / "data", root / "tmp"
    data.mkdir()
    tmp.mkdir()
    shutil.copy(small_ct, data / "ct.nii.gz")
    (data / "link-out.nii.gz").symlink_to(small_ct)  # inside by name, outside once resolved
    os.mkfifo(data / "pipe.nii.gz")  # opening it for reading would wait for a writer for ever
    with serve("--weights", tiny_model, "--data-dir", data, "--max-upload-mb", MAX_UPLOAD_MB, log_dir=root,
               env={"TMPDIR": str(tmp)}) as server:
        yield Hostile(server, data, tmp)


@pytest.fixture(scope="module")
def run():
    """Runs a coroutine in an event loop of its own thread (Playwright's sync API holds this thread's loop);
    connections opened in one call stay usable in the next."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield lambda coroutine, timeout=120: asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)
    loop.call_soon_threadsafe(loop.stop)
    thread.join()


# ---- a wslink client ------------------------------------------------------------------------------------


class Closed(Exception):
    """The server ended the connection."""


class Wslink:
    """wslink as trame's page speaks it: msgpack messages cut into chunks, each with a 12-byte header."""

    def __init__(self, session, ws):
        self.session, self.ws = session, ws
        self.calls = 0
        self.state: dict = {}  # the state as the server pushed it to this client
        self._partial: dict[int, bytearray] = {}

    @classmethod
    async def open(cls, hostile: Hostile, secret: str | None = None, **headers) -> Wslink:
        """Connect (with the page's own Origin unless ``headers`` say otherwise); authenticate with ``secret``."""
        headers = {"Origin": hostile.base, **headers}
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(f"{hostile.base}/ws", headers=headers, max_msg_size=0)
        except BaseException:
            await session.close()
            raise
        client = cls(session, ws)
        if secret is not None:
            reply = await client.hello(secret)
            assert "result" in reply, reply
            client.state.update((await client.call("trame.state.get"))["result"]["state"])
        return client

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()

    async def hello(self, secret) -> dict:
        return await self.call("wslink.hello", {"secret": secret}, rpc_id="system:c0:0")

    async def call(self, method: str, *args, rpc_id: str | None = None) -> dict:
        self.calls += 1
        rpc_id = rpc_id or f"rpc:test:{self.calls}"
        await self.send({"wslink": "1.0", "id": rpc_id, "method": method, "args": list(args), "kwargs": {}})
        while (reply := await self.receive())["id"] != rpc_id:
            pass
        return reply

    async def trigger(self, name: str, *args):
        reply = await self.call("trame.trigger", name, list(args), {})
        assert "error" not in reply, reply
        return reply["result"]

    async def update(self, **values) -> None:
        """Change the state as the page does: here at once, then on the server."""
        self.state.update(values)
        reply = await self.call("trame.state.update", [{"key": key, "value": value} for key, value in values.items()])
        assert "error" not in reply, reply

    async def send(self, message: dict) -> None:
        packed = msgpack.packb(message, use_bin_type=True)
        message_id = random.getrandbits(32)
        for offset in range(0, len(packed), FRAME_BYTES - HEADER.size):
            chunk = packed[offset : offset + FRAME_BYTES - HEADER.size]
            await self.ws.send_bytes(HEADER.pack(message_id, offset, len(packed)) + chunk)

    async def receive(self, timeout: float = 30) -> dict:
        """The next whole message; the state it pushes is noted."""
        while True:
            frame = await self.ws.receive(timeout=timeout)
            if frame.type != aiohttp.WSMsgType.BINARY:
                raise Closed(f"{frame.type.name} {self.ws.close_code}")
            message_id, offset, total = HEADER.unpack_from(frame.data)
            content = self._partial.setdefault(message_id, bytearray(total))
            content[offset : offset + len(frame.data) - HEADER.size] = frame.data[HEADER.size :]
            if offset + len(frame.data) - HEADER.size >= total:
                message = msgpack.unpackb(bytes(self._partial.pop(message_id)))
                if str(message.get("id", "")).startswith("publish:trame.state.topic"):
                    self.state.update(message["result"])
                return message

    async def wait_until(self, check, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not check(self.state):
            left = deadline - time.monotonic()
            shown = {key: value for key, value in self.state.items() if len(repr(value)) < 200}
            assert left > 0, f"the server never pushed the state awaited; it pushed: {shown}"
            try:
                await self.receive(timeout=left)
            except asyncio.TimeoutError:
                continue

    async def load(self, typed: str) -> tuple[str, str]:
        """Load by path as the page does; the status and error the load ended with."""
        await self.update(error_message="", server_path=typed)
        await self.trigger("load_server_path")
        return await self.loaded()

    async def loaded(self) -> tuple[str, str]:
        """Once a load has started and ended: its status and error."""
        await self.wait_until(lambda state: state["loading"], timeout=10)
        await self.wait_until(lambda state: not state["loading"], timeout=LOAD_S)
        return self.state["status"], self.state["error_message"]

    async def upload(self, files: dict[str, bytes], announced_bytes: int | None = None) -> list:
        """Upload as the page does (announce, slices, end); the server's answers."""
        total = sum(map(len, files.values())) if announced_bytes is None else announced_bytes
        answers = [await self.trigger("upload_begin", len(files), total)]
        if not answers[0]:
            return answers
        for name, data in files.items():
            for start in range(0, max(len(data), 1), SLICE_BYTES):
                answers.append(await self.trigger("upload_part", name, start, len(data), data[start : start + SLICE_BYTES]))
                if not answers[-1]:
                    return answers
        await self.trigger("upload_end")
        return answers


async def connect(hostile: Hostile) -> Wslink:
    client = await Wslink.open(hostile, hostile.token)
    await client.update(error_message="")  # what an earlier test left on the shared page
    return client


def upload_folders(hostile: Hostile) -> list[Path]:
    return sorted(hostile.tmp.glob("attention-unet-seg-upload-*"))


# ---- the token -------------------------------------------------------------------------------------------


def test_the_printed_address_holds_a_fresh_token_and_the_page_needs_it(hostile):
    assert len(hostile.token) >= 40 and hostile.token != "wslink-secret"  # secrets.token_urlsafe(32)
    for address in (f"{hostile.base}/", f"{hostile.base}/index.html", f"{hostile.base}/?secret=wslink-secret",
                    f"{hostile.base}/?secret={hostile.token[:-1]}"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(address, timeout=10)
        assert refused.value.code == 403
        assert refused.value.read().decode().startswith("error: no valid token in the address; ")
    with urllib.request.urlopen(hostile.server.url, timeout=10) as page:
        assert page.status == 200 and page.headers["X-Frame-Options"] == "DENY"


def test_a_websocket_without_the_token_can_do_nothing(hostile, run):
    async def scenario():
        for secret in (None, "wslink-secret", hostile.token.upper(), 12345):  # none, trame's public one, wrong
            client = await Wslink.open(hostile)
            if secret is not None:
                assert (await client.hello(secret))["error"]["message"] == "Authentication failed"
            for method, args in (("trame.state.get", ()), ("trame.trigger", ("load_server_path", [], {})),
                                 ("trame.state.update", ([{"key": "server_path", "value": "hostile.nii.gz"}],))):
                assert "Unauthorized" in (await client.call(method, *args))["error"]["message"]
            await client.close()
        watcher = await connect(hostile)
        assert watcher.state["server_path"] != "hostile.nii.gz"
        await watcher.close()

    run(scenario())


# ---- the origin ------------------------------------------------------------------------------------------


def test_a_websocket_from_another_origin_is_refused_even_with_the_token(hostile, run):
    port = int(hostile.base.rsplit(":", 1)[1])
    foreign = [{"Origin": f"http://127.0.0.1:{port + 1}"}, {"Origin": "null"}, {"Origin": "https://evil.example"},
               {"Origin": f"http://localhost:{port}"},  # the same server by another name is another origin
               {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}]  # DNS rebinding

    async def scenario():
        for headers in foreign:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await Wslink.open(hostile, hostile.token, **headers)
            assert refused.value.status == 403, headers
        await (await Wslink.open(hostile, hostile.token)).close()  # the page's own origin still connects

    run(scenario())
    request = urllib.request.Request(hostile.server.url, headers={"Origin": f"http://127.0.0.1:{port + 1}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403


def hostile_page(hostile: Hostile) -> str:
    """A page that tries, from its own origin, what the issue's attacker did: connect with and without the
    token, load a CT by path, segment and download; and frame the real page with the token."""
    def frames(secret: str) -> list[list[int]]:
        messages = [("system:c0:0", "wslink.hello", [{"secret": secret}]),
                    ("rpc:x:1", "trame.state.update", [[{"key": "server_path", "value": "ct.nii.gz"}]]),
                    ("rpc:x:2", "trame.trigger", ["load_server_path", [], {}]),
                    ("rpc:x:3", "trame.trigger", ["segment_or_cancel", [], {}]),
                    ("rpc:x:4", "trame.trigger", ["segmentation_file", [], {}])]
        packed = [msgpack.packb({"wslink": "1.0", "id": i, "method": m, "args": a, "kwargs": {}}) for i, m, a in messages]
        return [list(HEADER.pack(n, 0, len(p)) + p) for n, p in enumerate(packed, 1)]

    attempts = {"with the token": frames(hostile.token), "with trame's public secret": frames("wslink-secret")}
    ws_url = hostile.base.replace("http://", "ws://") + "/ws"
    return f"""<!doctype html><title>hostile</title>
<iframe id="framed" src="{hostile.server.url}"></iframe>
<script>
const attempts = {json.dumps(attempts)};
function attempt(frames) {{
  return new Promise((resolve) => {{
    const seen = {{opened: false, replies: 0}};
    const ws = new WebSocket("{ws_url}");
    ws.binaryType = "arraybuffer";
    ws.onopen = () => {{ seen.opened = true; frames.forEach((f) => ws.send(new Uint8Array(f))); }};
    ws.onmessage = () => {{ seen.replies += 1; }};
    ws.onclose = () => resolve(seen);
    setTimeout(() => resolve(seen), 3000);
  }});
}}
window.results = (async () => {{
  const results = {{}};
  for (const [label, frames] of Object.entries(attempts)) results[label] = await attempt(frames);
  results.fetch = await fetch("{hostile.server.url}").then((r) => "read " + r.status, () => "blocked");
  return results;
}})();
</script>"""


@pytest.fixture
def hostile_site(hostile, tmp_path):
    """The hostile page, served from another 127.0.0.1 port: another origin, as a web site would be."""
    (tmp_path / "index.html").write_text(hostile_page(hostile))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_port}/index.html"
    site.shutdown()


def test_a_page_on_another_origin_can_do_nothing_with_or_without_the_token(hostile, hostile_site, browser, run):
    watcher = run(connect(hostile))
    before = dict(watcher.state)
    page = browser.new_page()
    page.goto(hostile_site)
    results = page.evaluate("window.results")
    page.close()
    for label in ("with the token", "with trame's public secret"):
        assert results[label] == {"opened": False, "replies": 0}, label
    assert results["fetch"] == "blocked"
    state = run(watcher.call("trame.state.get"))["result"]["state"]
    assert state["tabs_open"] == before["tabs_open"]  # the framed page (X-Frame-Options: DENY) never connected
    assert (state["status"], state["ct_name"], state["loading"]) == (before["status"], before["ct_name"], False)
    run(watcher.close())


# ---- uploads ---------------------------------------------------------------------------------------------


def test_upload_names_cannot_leave_the_private_folder(hostile, small_ct, tmp_path, run):
    target = tmp_path / "escaped" / "ct.nii.gz"  # where "../"s or an absolute name would put the file
    target.parent.mkdir()
    ct = small_ct.read_bytes()

    async def scenario():
        client = await connect(hostile)
        for name in ("../" * 30 + str(target).lstrip("/"), str(target), "..\\..\\ct.nii.gz"):
            assert all(await client.upload({name: ct}))
            status, error = await client.loaded()
            assert status.startswith("Loaded ct (") and not error
        for name in ("..", "/", "dir/..", "a\0b"):
            assert (await client.upload({name: b"x"}))[-1] is False
            await client.wait_until(lambda state: "refused the upload name" in state["error_message"])
            await client.update(error_message="")
        await client.close()

    run(scenario())
    assert list(target.parent.iterdir()) == []
    assert sorted(p.name for p in hostile.data.iterdir()) == ["ct.nii.gz", "link-out.nii.gz", "pipe.nii.gz"]
    assert upload_folders(hostile) == []  # each upload's folder is removed once read or refused


def test_an_upload_over_the_limit_is_refused_before_and_while_it_is_sent(hostile, run):
    limit = MAX_UPLOAD_MB * 2**20

    async def scenario():
        client = await connect(hostile)
        assert await client.upload({"big.nii.gz": b""}, announced_bytes=limit + 1) == [False]  # refused at once
        await client.wait_until(lambda state: "refused an upload of 1 files" in state["error_message"])
        assert f"at most 20000 files and {MAX_UPLOAD_MB} MB" in client.state["error_message"]
        # A client that announces little and sends more: refused when the bytes pass the limit.
        answers = await client.upload({"a.dcm": bytes(limit // 2 + 1), "b.dcm": bytes(limit // 2 + 1)},
                                      announced_bytes=1)
        assert answers[-1] is False and all(answers[:-1])
        await client.wait_until(lambda state: f"it is over {MAX_UPLOAD_MB} MB" in state["error_message"])
        assert await client.trigger("upload_begin", 1, 10)
        assert await client.trigger("upload_part", "c.dcm", 0, 10, b"x" * 10)
        assert await client.trigger("upload_part", "c.dcm", 10, 10, b"more") is False  # past its announced size
        await client.wait_until(lambda state: "longer than the page announced" in state["error_message"])
        await client.wait_until(lambda state: not state["uploading"])
        await client.close()

    run(scenario())
    assert upload_folders(hostile) == []


def test_a_tab_closed_mid_upload_leaves_no_spinner_in_the_other_tabs(hostile, small_ct, tmp_path, browser, run):
    chosen = tmp_path / "chosen.nii.gz"
    shutil.copy(small_ct, chosen)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(hostile.server.url)
    page.locator(".shared-session").wait_for()
    assert "secret=" not in page.url  # trame's page takes the token out of the address bar
    files = page.locator("input[type=file]:not([webkitdirectory])")
    files.wait_for(state="attached")

    closing = run(connect(hostile))
    assert run(closing.trigger("upload_begin", 1, 1000)) and run(closing.trigger("upload_part", "x", 0, 1000, b"1"))
    page.locator(".upload-busy").wait_for()  # the other tab shows the upload under way
    assert len(upload_folders(hostile)) == 1
    run(closing.close())  # the uploading tab goes away mid-upload
    page.locator(".upload-busy").wait_for(state="detached")
    assert upload_folders(hostile) == []
    files.set_input_files(chosen)  # and this tab can upload
    page.locator(".status-text").filter(has_text="Loaded chosen (").wait_for(timeout=LOAD_S * 1000)
    page.close()


# ---- messages --------------------------------------------------------------------------------------------


def test_a_frame_declaring_a_huge_message_is_refused_without_allocating_it(hostile, run):
    async def refused(frames: list[bytes]) -> str:
        client = await connect(hostile)
        for frame in frames:
            await client.ws.send_bytes(frame)
        with pytest.raises(Closed) as closed:
            await client.receive(timeout=20)
        await client.session.close()
        return str(closed.value)

    async def scenario():
        client = await Wslink.open(hostile)
        assert (await client.hello(hostile.token))["result"]["maxMsgSize"] == FRAME_BYTES  # what the page cuts to
        await client.close()
        rss_before = hostile.rss_mb()
        await refused([HEADER.pack(1, 0, 3 * 2**30) + b"\x80"])  # 3 GiB announced, 1 byte sent
        assert hostile.rss_mb() - rss_before < 100
        # Several pending messages, each under the cap, do not add up past it.
        await refused([HEADER.pack(n, 0, 5 * 2**20) + b"\x80" for n in (1, 2)])
        assert hostile.rss_mb() - rss_before < 100
        assert "1009" in await refused([HEADER.pack(1, 0, 2 * FRAME_BYTES) + bytes(2 * FRAME_BYTES)])  # too big
        await (await connect(hostile)).close()  # the server goes on serving

    run(scenario())
    log = hostile.server.stderr.read_text()
    assert "closed a websocket: a message of 3221225472 bytes is over the cap" in log
    assert "Traceback" not in log


# ---- server-owned state ----------------------------------------------------------------------------------


def test_client_writes_to_server_owned_state_are_undone_and_wedge_nothing(hostile, run):
    owned = {"segmenting": True, "loading": True, "uploading": True, "has_result": True, "status": "hacked",
             "ct_name": "another patient", "progress": 42, "tabs_open": 99, "error_message": "fake error",
             "attention_gates": ["evil"]}

    async def scenario():
        client = await connect(hostile)
        truth = {key: client.state[key] for key in owned}
        await client.update(**owned)
        await client.wait_until(lambda state: all(state[key] == truth[key] for key in owned))
        state = (await client.call("trame.state.get"))["result"]["state"]
        assert {key: state[key] for key in owned} == truth
        assert (await client.load("ct.nii.gz"))[0].startswith("Loaded ct (")  # "loading" was not believed
        await client.close()

    run(scenario())


def test_an_unknown_gate_preset_or_format_is_refused(hostile, run):
    refused = {"attention_gate": "level9", "window_level_preset": "Nope", "segmentation_format": "/../../x.nii.gz",
               "attention_opacity": "lots", "attention_visible": "yes"}

    async def scenario():
        client = await connect(hostile)
        for key, value in [*refused.items(), ("attention_gate", ["level2"]), ("attention_opacity", float("nan"))]:
            kept = client.state[key]
            await client.update(**{key: value})
            await client.wait_until(lambda state, key=key: f"refused the {key.replace('_', ' ')}" in state["error_message"])
            await client.wait_until(lambda state, key=key, kept=kept: state[key] == kept)
            assert "it must be " in client.state["error_message"]
            await client.update(error_message="")
        await client.update(attention_gate="level3")  # a valid choice is taken
        await asyncio.sleep(0.5)
        state = (await client.call("trame.state.get"))["result"]["state"]
        assert state["attention_gate"] == "level3" and not state["error_message"]
        await client.update(attention_gate="combined")
        await client.close()

    run(scenario())


# ---- loading by path -------------------------------------------------------------------------------------


def test_loading_outside_the_data_dir_gets_one_message_that_names_no_server_path(hostile, small_ct, run):
    outside = [str(small_ct), os.path.relpath(small_ct, hostile.data), "link-out.nii.gz", "/etc/passwd",
               "/nonexistent/ct.nii.gz", "missing.nii.gz", "../" * 20, "a\0b"]

    async def scenario():
        client = await connect(hostile)
        answers = {typed: await client.load(typed) for typed in outside}
        _, error = await client.load("pipe.nii.gz")  # inside, but a pipe: refused, not waited on
        assert "is not a file or a folder" in error
        assert (await client.load("ct.nii.gz"))[0].startswith("Loaded ct (")  # inside, relative to the folder
        await client.close()
        return answers

    answers = run(scenario())
    errors = {error for _, error in answers.values()}
    assert len(errors) == 1, answers  # outside or missing: the page cannot tell which
    (error,) = errors
    assert error.startswith(REFUSED_PATH) and str(hostile.data) in error
    assert str(small_ct.parent) not in error and "/etc" not in error and "nonexistent" not in error


# ---- the command line ------------------------------------------------------------------------------------


def test_a_host_beyond_loopback_is_warned_about_and_a_missing_data_dir_refused(tiny_model, tmp_path):
    def serve_command(*args) -> subprocess.CompletedProcess:
        env = {**os.environ, "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow"}
        return subprocess.run([str(CONSOLE_SCRIPT), "serve", "--weights", str(tiny_model), "--device", "cpu", *args],
                              capture_output=True, text=True, timeout=120, env=env, check=False)

    missing = serve_command("--data-dir", str(tmp_path / "missing"))
    assert missing.returncode == 2
    assert f"error: --data-dir {tmp_path / 'missing'} is not a folder;" in missing.stderr
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the warning comes, then the refusal to listen.
    if Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() != "0":
        pytest.skip("this machine lets a server listen on addresses it does not have (ip_nonlocal_bind)")
    beyond = serve_command("--host", "192.0.2.1", "--port", "8080")
    assert "warning: --host 192.0.2.1 opens the server beyond this machine" in beyond.stderr
    assert beyond.returncode == 2 and "error: cannot listen on 192.0.2.1:8080" in beyond.stderr
    assert "Traceback" not in beyond.stderr
