"""scripts/download_flickr8k.sh against local HTTP servers (no network)."""

import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile

import pytest

import data_fixtures
from nlmm_jax.data import flickr8k

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "download_flickr8k.sh")
NAMES = ("Flickr8k_Dataset.zip", "Flickr8k_text.zip", "flickr_audio.tar.gz")
URL_VARS = ("FLICKR8K_IMAGES_URL", "FLICKR8K_TEXT_URL", "FLICKR_AUDIO_URL")
MD5_VARS = ("FLICKR8K_IMAGES_MD5", "FLICKR8K_TEXT_MD5", "FLICKR_AUDIO_MD5")

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or not (shutil.which("curl") or shutil.which("wget")),
    reason="needs bash and curl or wget")


def _md5(path):
  with open(path, "rb") as f:
    return hashlib.md5(f.read()).hexdigest()


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
  """Archives shaped like the official ones, built from a fixture tree."""
  src = tmp_path_factory.mktemp("src")
  tree = data_fixtures.make_flickr8k_tree(src, layout="flat", n_images=12)
  out = tmp_path_factory.mktemp("served")
  with zipfile.ZipFile(out / NAMES[0], "w") as z:
    for name in sorted(os.listdir(tree["image_dir"])):
      z.write(os.path.join(tree["image_dir"], name), f"Flicker8k_Dataset/{name}")
      z.writestr(f"__MACOSX/Flicker8k_Dataset/._{name}", b"\x00resource fork")
  with zipfile.ZipFile(out / NAMES[1], "w") as z:
    for name in sorted(os.listdir(src)):
      if name.endswith(".txt"):
        z.write(src / name, name)
  with tarfile.open(out / NAMES[2], "w:gz") as t:
    t.add(tree["audio_dir"], "flickr_audio")
  return dict(dir=str(out), tree=tree, md5={n: _md5(out / n) for n in NAMES})


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(args, urls=None, md5=None, extra_env=None, timeout=120):
  env = dict(os.environ, PYTHON=sys.executable, RETRIES="3")
  for var in URL_VARS + MD5_VARS:
    env.pop(var, None)
  for var, value in zip(URL_VARS, urls or ()):
    env[var] = value
  for var, value in zip(MD5_VARS, md5 or ()):
    env[var] = value
  env.update(extra_env or {})
  return subprocess.run(["bash", SCRIPT] + args, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _check_result(root, archives):
  for name in NAMES:
    with open(os.path.join(root, "downloads", name), "rb") as got:
      with open(os.path.join(archives["dir"], name), "rb") as want:
        assert got.read() == want.read()
  index = flickr8k.load_index(root, max_lost_fraction=0.0)
  assert index.has_audio
  for split, ids in archives["tree"]["expected"].items():
    assert [e.image_id for e in index.splits[split].examples] == ids
  assert not os.path.exists(os.path.join(root, "Flickr8k_Dataset", "__MACOSX"))
  with open(os.path.join(root, "downloads", "SHA256SUMS")) as f:
    sums = dict(reversed(line.split()) for line in f)
  for name in NAMES:
    with open(os.path.join(archives["dir"], name), "rb") as f:
      assert sums[name] == hashlib.sha256(f.read()).hexdigest()


def test_plain_http_server_partial_file_restarts(tmp_path, archives):
  """`python -m http.server` ignores Range: a partial file is fetched again in full."""
  port = _free_port()
  server = subprocess.Popen(
      [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
       "--directory", archives["dir"]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    for _ in range(100):
      try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        break
      except OSError:
        time.sleep(0.05)
    root = tmp_path / "flickr8k"
    (root / "downloads").mkdir(parents=True)
    with open(os.path.join(archives["dir"], NAMES[0]), "rb") as f:
      data = f.read()
    (root / "downloads" / (NAMES[0] + ".part")).write_bytes(data[:len(data) * 2 // 5])
    urls = [f"http://127.0.0.1:{port}/{n}" for n in NAMES]
    res = _run([str(root)], urls=urls)
    assert res.returncode == 0, res.stderr
    assert "train: 8 images" in res.stdout
    _check_result(str(root), archives)
  finally:
    server.terminate()
    server.wait()
  # Server gone: a rerun finds everything verified and unpacked.
  res = _run([str(root)], urls=urls)
  assert res.returncode == 0, res.stderr
  assert res.stderr.count("already downloaded and verified") == 3
  res = _run(["--check", str(root)])
  assert res.returncode == 0 and "test : 2 images" in res.stdout


class _RangeHandler(http.server.BaseHTTPRequestHandler):
  """Serves bytes with Range support; can cut the first full response short."""
  files: dict = {}
  truncate_once: set = set()
  log: list = []

  def do_GET(self):  # pylint: disable=invalid-name
    name = self.path.lstrip("/")
    rng = self.headers.get("Range")
    self.log.append((name, rng))
    if name not in self.files:
      self.send_error(404)
      return
    data = self.files[name]
    start = int(rng.split("=")[1].split("-")[0]) if rng else 0
    if start >= len(data):
      self.send_response(416)
      self.send_header("Content-Range", f"bytes */{len(data)}")
      self.send_header("Content-Length", "0")
      self.end_headers()
      return
    self.send_response(206 if rng else 200)
    if rng:
      self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    self.send_header("Content-Length", str(len(data) - start))
    self.end_headers()
    body = data[start:]
    if not rng and name in self.truncate_once:
      self.truncate_once.discard(name)
      body = body[:len(body) // 2]  # connection drops mid-transfer
    self.wfile.write(body)

  def log_message(self, *args):
    pass


@pytest.fixture
def range_server(archives):
  files = {}
  for n in NAMES:
    with open(os.path.join(archives["dir"], n), "rb") as f:
      files[n] = f.read()
  handler = type("Handler", (_RangeHandler,), dict(files=files, truncate_once=set(), log=[]))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server, handler
  server.shutdown()
  server.server_close()


def test_resumes_truncated_downloads(tmp_path, archives, range_server):
  server, handler = range_server
  port = server.server_address[1]
  urls = [f"http://127.0.0.1:{port}/{n}" for n in NAMES]
  md5 = [archives["md5"][n] for n in NAMES]
  root = tmp_path / "r"
  (root / "downloads").mkdir(parents=True)
  text = handler.files[NAMES[1]]
  (root / "downloads" / (NAMES[1] + ".part")).write_bytes(text[:len(text) // 3])
  handler.truncate_once.add(NAMES[2])
  res = _run([str(root)], urls=urls, md5=md5)
  assert res.returncode == 0, res.stderr
  _check_result(str(root), archives)
  log = handler.log
  assert (NAMES[1], f"bytes={len(text) // 3}-") in log
  audio = handler.files[NAMES[2]]
  assert [r for n, r in log if n == NAMES[2]] == [None, f"bytes={len(audio) // 2}-"]
  assert [r for n, r in log if n == NAMES[0]] == [None]


def test_wrong_checksum_fails(tmp_path, archives, range_server):
  server, handler = range_server
  port = server.server_address[1]
  urls = [f"http://127.0.0.1:{port}/{n}" for n in NAMES]
  root = tmp_path / "bad"
  res = _run([str(root)], urls=urls, md5=["0" * 32])
  assert res.returncode != 0
  assert "MD5" in res.stderr and "Flickr8k_Dataset.zip" in res.stderr
  assert not os.path.exists(root / "Flickr8k_Dataset")
  assert [n for n, _ in handler.log] == [NAMES[0]] * 2  # retried once from scratch


def test_check_rejects_bad_dir(tmp_path):
  res = _run(["--check", str(tmp_path)])
  assert res.returncode == 1
  assert "scripts/download_flickr8k.sh" in res.stderr
  res = _run(["--check", str(tmp_path / "missing")])
  assert res.returncode != 0


def test_corrupt_full_file_without_unzip(tmp_path, archives, range_server):
  """A complete-size but damaged archive is replaced; unzip absent: python -m zipfile."""
  server, handler = range_server
  port = server.server_address[1]
  urls = [f"http://127.0.0.1:{port}/{n}" for n in NAMES]
  md5 = [archives["md5"][n] for n in NAMES]
  root = tmp_path / "c"
  (root / "downloads").mkdir(parents=True)
  data = bytearray(handler.files[NAMES[0]])
  data[len(data) // 2] ^= 0xFF
  (root / "downloads" / NAMES[0]).write_bytes(bytes(data))
  bin_dir = tmp_path / "bin"  # everything on PATH but unzip
  bin_dir.mkdir()
  for d in os.environ["PATH"].split(os.pathsep):
    if os.path.isdir(d):
      for name in os.listdir(d):
        if name != "unzip" and not (bin_dir / name).exists():
          os.symlink(os.path.join(d, name), bin_dir / name)
  res = _run([str(root)], urls=urls, md5=md5, extra_env=dict(PATH=str(bin_dir)))
  assert res.returncode == 0, res.stderr
  assert "present but not verified" in res.stderr
  _check_result(str(root), archives)
  assert [r for n, r in handler.log if n == NAMES[0]] == [f"bytes={len(data)}-", None]
