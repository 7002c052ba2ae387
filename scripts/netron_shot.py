#!/usr/bin/env python3
r"""Open an ONNX model in real Netron (headless Chromium), count the drawn Conv
nodes and save a screenshot.

Usage:
    python scripts/netron_shot.py MODEL.onnx --expect-conv N --out shot.png
        [--crop REGEX] [--margin PX] [--scale F] [--timeout S]
        [--chromium PATH] [--viewport WxH]

Example (the README pictures: blocks stage2.0, no identity, and stage2.1,
with identity, plus the Relu feeding them):
    target/release/onnx-repvgg fuse testdata/models/tiny/ts_fold_op17.onnx /tmp/fused.onnx
    R='^/stage1/stage1\.0/nonlinearity/|stage2\.'
    python scripts/netron_shot.py testdata/models/tiny/ts_fold_op17.onnx --expect-conv 14 \
        --crop "$R" --scale 1.5 --out scripts/pictures/netron-training.png
    python scripts/netron_shot.py /tmp/fused.onnx --expect-conv 7 \
        --crop "$R" --scale 1.5 --out scripts/pictures/netron-deploy.png

Setup (once; see scripts/requirements-netron.txt):
    python3 -m venv /root/venv-netron
    /root/venv-netron/bin/pip install -r scripts/requirements-netron.txt
    apt-get install -y chromium fonts-ipafont-gothic
    # chromium: the browser Playwright drives (never `playwright install`);
    # the font has U+3008/U+3009, which Netron uses around tensor shapes.

What it does and checks:
  1. serves MODEL with the `netron` Python package (netron.serve, browse=False)
     on 127.0.0.1 at a free port;
  2. opens it in headless Chromium through Playwright, using the system
     browser (--chromium, default /usr/bin/chromium or $NETRON_CHROMIUM);
     every request that does not go to the local server (Netron's
     geolocation and analytics calls) is aborted, the cookie-consent
     notice is pre-accepted, and the page's build date is rewritten to
     today so that Netron's "Please update to the newest version" nag
     (shown for builds older than 180 days) can never block the graph;
  3. waits until Netron has rendered the graph: <body> has class "default",
     #canvas holds at least one <g class="node graph-node"> and none of them
     is still hidden (Netron builds nodes with opacity 0 and clears it after
     layout), and the node list stays the same over consecutive polls;
  4. reads each node's op type from its header: the first
     <g class="node-item node-item-type ..."><text> inside the graph-node
     group is the op type as drawn ("Conv", "Add", ...), and counts "Conv";
  5. fails if the count differs from --expect-conv, if Netron's message
     dialog (#message: error alert or notification) is visible, or if the
     page threw an uncaught exception;
  6. saves a PNG screenshot to --out: the whole viewport, or with --crop
     REGEX the box around the nodes whose ONNX name matches REGEX (node
     group ids are "node-name-<name>"), plus --margin pixels;
  7. stops the server and the browser.

Exit status 0 when all checks pass, 1 when a check fails, 2 on a usage or
setup error. Everything is bounded by --timeout (default 45 s in all).
"""

import argparse
import json
import logging
import os
import re
import signal
import sys
import time
from datetime import datetime, timezone

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# Runs in the page; returns what Netron has drawn so far.
PROBE_JS = """() => {
  const body = document.body ? document.body.className : '';
  const nodes = Array.from(document.querySelectorAll('#canvas g.graph-node'));
  const ops = nodes.map((n) => {
    const t = n.querySelector('g.node-item-type text');
    return t ? t.textContent : null;
  });
  const hidden = nodes.filter((n) => n.style.opacity === '0').length;
  const box = document.getElementById('message');
  const shown = box ? getComputedStyle(box).display !== 'none' : false;
  const text = document.getElementById('message-text');
  return {
    body: body,
    ids: nodes.map((n) => n.id),
    ops: ops,
    hidden: hidden,
    message: shown ? (text ? text.innerText : '(empty)') : null,
  };
}"""

# Bounding box (viewport CSS pixels) of the node groups with the given ids.
BOX_JS = """(ids) => {
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const id of ids) {
    const e = document.getElementById(id);
    if (!e) continue;
    const r = e.getBoundingClientRect();
    x0 = Math.min(x0, r.left); y0 = Math.min(y0, r.top);
    x1 = Math.max(x1, r.right); y1 = Math.max(y1, r.bottom);
  }
  return x0 === Infinity ? null : {x: x0, y: y0, w: x1 - x0, h: y1 - y0};
}"""

CANVAS_JS = """() => {
  const c = document.getElementById('canvas');
  if (!c) return null;
  const r = c.getBoundingClientRect();
  return {w: Math.ceil(r.width), h: Math.ceil(r.height)};
}"""


class Failure(Exception):
    """A check failed (exit 1)."""


def node_name(dom_id):
    prefix = "node-name-"
    return dom_id[len(prefix):] if dom_id.startswith(prefix) else dom_id


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Render MODEL in Netron (headless Chromium), check the drawn Conv count, save a PNG.")
    p.add_argument("model", help="ONNX model file to open")
    p.add_argument("--expect-conv", type=int, default=None,
                   help="number of Conv nodes Netron must draw (omit to only report)")
    p.add_argument("--out", default="netron.png", help="PNG screenshot path (default netron.png)")
    p.add_argument("--crop", metavar="REGEX", default=None,
                   help="crop the screenshot to the nodes whose ONNX name matches REGEX (re.search)")
    p.add_argument("--margin", type=int, default=16, help="pixels around the --crop box (default 16)")
    p.add_argument("--scale", type=float, default=1.0, help="device scale factor (default 1)")
    p.add_argument("--viewport", default="1280x900", help="browser viewport WxH (default 1280x900)")
    p.add_argument("--timeout", type=float, default=45.0,
                   help="seconds for the whole run (default 45)")
    p.add_argument("--chromium", default=os.environ.get("NETRON_CHROMIUM", "/usr/bin/chromium"),
                   help="Chromium executable (default $NETRON_CHROMIUM or /usr/bin/chromium)")
    args = p.parse_args(argv)
    m = re.fullmatch(r"(\d+)x(\d+)", args.viewport)
    if not m:
        p.error("--viewport must look like 1280x900")
    args.viewport = (int(m.group(1)), int(m.group(2)))
    if args.crop is not None:
        try:
            args.crop_re = re.compile(args.crop)
        except re.error as e:
            p.error(f"--crop: {e}")
    return args


def run(args, log):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright
    import netron

    t0 = time.monotonic()
    deadline = t0 + args.timeout

    def left_ms():
        return max(1000, int((deadline - time.monotonic()) * 1000))

    def step(what):
        log(f"[{time.monotonic() - t0:5.1f}s] {what}")

    logging.getLogger("netron.server").setLevel(logging.WARNING)
    # A browser closing mid-request makes the server thread print a
    # ConnectionResetError traceback; that is noise here.
    server_cls = getattr(netron.server, "_ThreadedHTTPServer", None)
    if server_cls is not None:
        server_cls.handle_error = lambda self, request, client_address: None
    host, port = netron.serve(args.model, None, address=("127.0.0.1", 0), browse=False)
    origin = f"http://{host}:{port}"
    step(f"netron {netron.__version__} serving {args.model} at {origin}")
    page_errors = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS,
                timeout=left_ms())
            page = None
            try:
                step(f"chromium {browser.version} started")
                context = browser.new_context(
                    viewport={"width": args.viewport[0], "height": args.viewport[1]},
                    device_scale_factor=args.scale, color_scheme="light",
                    service_workers="block")
                # Netron asks for cookie consent unless one of these is set.
                context.add_cookies([{"name": "consent", "value": str(int(time.time() * 1000)),
                                      "url": origin}])
                today = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

                def route(r):
                    url = r.request.url
                    if not url.startswith(origin + "/"):
                        r.abort()  # offline: geolocation, analytics, anything else
                        return
                    path = url[len(origin):].split("?")[0].split("#")[0]
                    if path in ("/", "/index.html"):
                        resp = r.fetch()
                        html = re.sub(r'<meta name="date" content="[^"]*">',
                                      f'<meta name="date" content="{today}">', resp.text())
                        r.fulfill(response=resp, body=html)
                        return
                    r.continue_()

                context.route("**/*", route)
                page = context.new_page()
                page.on("pageerror", lambda e: page_errors.append(str(e)))
                # Netron replaces window.eval with a function that throws, which
                # breaks Playwright's page.evaluate; ask DevTools directly instead.
                cdp = context.new_cdp_session(page)

                def js(fn, arg=None):
                    res = cdp.send("Runtime.evaluate", {
                        "expression": f"({fn})({json.dumps(arg)})",
                        "returnByValue": True, "awaitPromise": True})
                    if "exceptionDetails" in res:
                        d = res["exceptionDetails"]
                        raise Failure("script error in page: "
                                      + d.get("exception", {}).get("description", d.get("text", "?")))
                    return res["result"].get("value")
                page.goto(origin + "/", wait_until="load", timeout=left_ms())
                step("page loaded, waiting for the graph")

                last, stable, probe = None, 0, None
                while True:
                    probe = js(PROBE_JS)
                    if probe["message"] is not None:
                        raise Failure(f"Netron shows a message dialog: {probe['message']!r}"
                                      f" (body class {probe['body']!r})")
                    ready = ("default" in probe["body"].split() and probe["ids"]
                             and probe["hidden"] == 0 and None not in probe["ops"])
                    key = (tuple(probe["ids"]), tuple(probe["ops"]))
                    if ready and key == last:
                        stable += 1
                        if stable >= 2:
                            break
                    else:
                        stable = 0
                    last = key if ready else None
                    if time.monotonic() > deadline:
                        raise Failure(
                            f"graph not rendered within {args.timeout:.0f}s: body class "
                            f"{probe['body']!r}, {len(probe['ids'])} node groups, "
                            f"{probe['hidden']} still hidden")
                    page.wait_for_timeout(250)
                ops = probe["ops"]
                counts = {}
                for op in ops:
                    counts[op] = counts.get(op, 0) + 1
                n_conv = counts.get("Conv", 0)
                step(f"graph rendered: {len(ops)} nodes drawn, "
                     + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))

                if args.crop is None:
                    page.screenshot(path=args.out, timeout=left_ms())
                    step(f"screenshot (viewport) saved to {args.out}")
                else:
                    ids = [i for i in probe["ids"] if args.crop_re.search(node_name(i))]
                    if not ids:
                        raise Failure(f"--crop {args.crop!r} matches no drawn node")
                    # Make the page big enough that the whole graph is on it, then
                    # bring the matching nodes to the top-left and clip around them.
                    canvas = js(CANVAS_JS) or {"w": 0, "h": 0}
                    w = min(max(args.viewport[0], canvas["w"] + 200), 6000)
                    h = min(max(args.viewport[1], canvas["h"] + 200), 6000)
                    page.set_viewport_size({"width": w, "height": h})
                    page.wait_for_timeout(200)
                    js("(id) => document.getElementById(id).scrollIntoView("
                       "{block: 'start', inline: 'nearest'})", ids[0])
                    box = js(BOX_JS, ids)
                    if box is None:
                        raise Failure("could not measure the --crop nodes")
                    m = args.margin
                    x, y = max(0, box["x"] - m), max(0, box["y"] - m)
                    clip = {"x": x, "y": y,
                            "width": min(box["x"] + box["w"] + m, w) - x,
                            "height": min(box["y"] + box["h"] + m, h) - y}
                    page.screenshot(path=args.out, clip=clip, timeout=left_ms())
                    step(f"screenshot of {len(ids)} nodes matching {args.crop!r} "
                         f"({clip['width']:.0f}x{clip['height']:.0f} CSS px) saved to {args.out}")

                probe = js(PROBE_JS)
                if probe["message"] is not None:
                    raise Failure(f"Netron shows a message dialog: {probe['message']!r}")
                if page_errors:
                    raise Failure("uncaught exception in the page: " + "; ".join(page_errors))
                if args.expect_conv is not None and n_conv != args.expect_conv:
                    raise Failure(f"Netron draws {n_conv} Conv nodes, expected {args.expect_conv}")
                step(f"OK: {n_conv} Conv nodes drawn"
                     + ("" if args.expect_conv is None else f" (expected {args.expect_conv})")
                     + ", no error dialog")
            except Failure:
                if page is not None:  # keep what the page showed, for the CI log
                    try:
                        page.screenshot(path=args.out, timeout=5000)
                        step(f"screenshot of the failing page saved to {args.out}")
                    except PlaywrightError:
                        pass
                raise
            finally:
                browser.close()
    except PlaywrightError as e:
        msg = str(e).strip().splitlines()
        raise Failure("browser: " + (msg[0] if msg else repr(e))) from e
    finally:
        netron.stop((host, port))
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    name = os.path.basename(__file__)

    def log(msg):
        print(f"{name}: {msg}", flush=True)

    if not os.path.isfile(args.model):
        log(f"error: model file {args.model!r} not found")
        return 2
    if not os.access(args.chromium, os.X_OK):
        log(f"error: Chromium not found at {args.chromium!r} (apt-get install chromium, or --chromium PATH)")
        return 2
    try:
        import netron  # noqa: F401
        import playwright  # noqa: F401
    except ImportError as e:
        log(f"error: {e}; pip install -r scripts/requirements-netron.txt")
        return 2
    # Last-resort watchdog in case something blocks outside Playwright's own
    # timeouts; exiting closes the Playwright driver, which ends the browser.
    def watchdog(signum, frame):
        log(f"FAIL: still running after {args.timeout + 15:.0f}s, giving up")
        os._exit(1)

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(int(args.timeout) + 15)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    try:
        return run(args, log)
    except Failure as e:
        log(f"FAIL: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
