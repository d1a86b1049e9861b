#!/usr/bin/env bash
# Downloads Flickr8k (images + text) and the Flickr Audio Caption Corpus (FACC), unpacks them
# into a layout that nlmm_jax.data.flickr8k accepts, and checks the result.
#
#   scripts/download_flickr8k.sh [--no-audio] DIR    download (resumable), verify, unpack, check
#   scripts/download_flickr8k.sh --check DIR         only check an unpacked DIR
#
# Archives go to DIR/downloads/ (about 1.1 GB + 4.2 GB); downloads resume where they stopped
# (curl -C -, or wget -c when curl is missing), so rerunning after an interruption is safe.
#
# What is checked, for each archive:
#   1. its MD5 against the value recorded below (the published FACC checksum, and the
#      checksums that other dataset loaders record for the GitHub release mirror of Flickr8k).
#      A URL override drops the recorded MD5 unless the matching *_MD5 variable is set too;
#      *_MD5="" skips it. Optional *_SHA256 variables add a SHA-256 check.
#   2. that the archive is complete: `unzip -tq` (or `python -m zipfile -t`) / `tar -tzf`.
#   A failed check after a resumed download deletes the file and downloads it once more
#   from scratch. The SHA-256 of each verified archive is written to
#   DIR/downloads/SHA256SUMS for later comparison.
# After unpacking, `python -m nlmm_jax.data.flickr8k --root DIR` parses the corpus, checks
# every image and WAV, and prints the per-split counts and what was lost (exit 1 on errors).
#
# Environment:
#   FLICKR8K_IMAGES_URL, FLICKR8K_TEXT_URL, FLICKR_AUDIO_URL   archive URLs
#   FLICKR8K_IMAGES_MD5, FLICKR8K_TEXT_MD5, FLICKR_AUDIO_MD5   expected MD5 ("" = skip)
#   FLICKR8K_IMAGES_SHA256, FLICKR8K_TEXT_SHA256, FLICKR_AUDIO_SHA256   expected SHA-256
#   PYTHON       interpreter with nlmm_jax's dependencies (default: python3)
#   RETRIES      download attempts per archive (default 5)
set -euo pipefail

DEFAULT_IMAGES_URL="https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip"
DEFAULT_TEXT_URL="https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip"
DEFAULT_AUDIO_URL="https://groups.csail.mit.edu/sls/downloads/flickraudio/downloads/flickr_audio.tar.gz"
DEFAULT_IMAGES_MD5="f18a1e2920de5bd84dae7cf08ec78978"
DEFAULT_TEXT_MD5="bf6c1abcb8e4a833b7f922104de18627"
DEFAULT_AUDIO_MD5="9d078f1f150c26e864aa64d1d733779a"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
RETRIES="${RETRIES:-5}"

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

log() { echo "[download_flickr8k] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

check_dir() {
  local dir="$1"
  log "checking ${dir}"
  PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}" \
    "${PYTHON}" -m nlmm_jax.data.flickr8k --root "${dir}"
}

digest() {  # digest md5|sha256 FILE
  local algo="$1" file="$2"
  if command -v "${algo}sum" >/dev/null 2>&1; then
    "${algo}sum" "${file}" | cut -d' ' -f1
  else
    "${PYTHON}" -c 'import hashlib, sys
h = hashlib.new(sys.argv[1])
with open(sys.argv[2], "rb") as f:
  for block in iter(lambda: f.read(1 << 20), b""):
    h.update(block)
print(h.hexdigest())' "${algo}" "${file}"
  fi
}

archive_ok() {  # archive_ok FILE NAME: the archive (of type NAME's extension) lists completely
  local file="$1" name="$2"
  case "${name}" in
    *.zip)
      if command -v unzip >/dev/null 2>&1; then
        unzip -tq "${file}" >/dev/null 2>&1
      else
        "${PYTHON}" -m zipfile -t "${file}" >/dev/null 2>&1
      fi ;;
    *.tar.gz|*.tgz) tar -tzf "${file}" >/dev/null 2>&1 ;;
    *) return 1 ;;
  esac
}

verify() {  # verify FILE NAME MD5 SHA256: 0 when every given check passes
  local file="$1" name="$2" md5="$3" sha="$4" got
  if [[ -n "${md5}" ]]; then
    got="$(digest md5 "${file}")"
    if [[ "${got}" != "${md5}" ]]; then
      log "${name}: MD5 ${got}, expected ${md5}"
      return 1
    fi
  fi
  if [[ -n "${sha}" ]]; then
    got="$(digest sha256 "${file}")"
    if [[ "${got}" != "${sha}" ]]; then
      log "${name}: SHA-256 ${got}, expected ${sha}"
      return 1
    fi
  fi
  if ! archive_ok "${file}" "${name}"; then
    log "${name}: archive is incomplete or damaged"
    return 1
  fi
  return 0
}

fetch() {  # fetch URL PART: resumable download into PART
  local url="$1" part="$2" attempt rc
  for ((attempt = 1; attempt <= RETRIES; attempt++)); do
    rc=0
    if command -v curl >/dev/null 2>&1; then
      local code
      code="$(curl -fL --connect-timeout 30 -C - -o "${part}" -w '%{http_code}' "${url}")" \
        || rc=$?
      if [[ "${code}" == 416 ]]; then  # nothing left to fetch: let verify() judge the file
        return 0
      fi
      if [[ ${rc} -eq 33 ]]; then  # server cannot resume: start over
        log "server does not resume; restarting $(basename "${part}")"
        rm -f "${part}"
        continue
      fi
    elif command -v wget >/dev/null 2>&1; then
      wget -c -O "${part}" "${url}" || rc=$?
    else
      die "neither curl nor wget is installed"
    fi
    [[ ${rc} -eq 0 ]] && return 0
    log "download attempt ${attempt}/${RETRIES} of ${url} failed (exit ${rc}); resuming"
    sleep "$((attempt < 5 ? attempt : 5))"
  done
  return 1
}

download() {  # download NAME URL MD5 SHA256
  local name="$1" url="$2" md5="$3" sha="$4"
  local file="${DL}/${name}" part="${DL}/${name}.part"
  if [[ -f "${file}" ]]; then
    if verify "${file}" "${name}" "${md5}" "${sha}"; then
      log "${name}: already downloaded and verified"
      return 0
    fi
    log "${name}: present but not verified; resuming it"
    mv -f "${file}" "${part}"
  fi
  local round
  for round in 1 2; do
    log "${name}: downloading ${url}$([[ -f "${part}" ]] && echo " (resuming at $(wc -c <"${part}") bytes)")"
    fetch "${url}" "${part}" || die "${name}: download failed"
    if verify "${part}" "${name}" "${md5}" "${sha}"; then
      mv -f "${part}" "${file}"
      # Record the SHA-256 of what was verified.
      local sum
      sum="$(digest sha256 "${file}")"
      { grep -v "  ${name}\$" "${DL}/SHA256SUMS" 2>/dev/null || true
        echo "${sum}  ${name}"; } >"${DL}/SHA256SUMS.tmp"
      mv -f "${DL}/SHA256SUMS.tmp" "${DL}/SHA256SUMS"
      log "${name}: verified (sha256 ${sum})"
      return 0
    fi
    log "${name}: verification failed; deleting it and downloading from scratch"
    rm -f "${part}"
  done
  die "${name}: still fails verification after a fresh download (${url})"
}

unzip_to() {  # unzip_to ZIP DEST
  mkdir -p "$2"
  if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$1" -d "$2" -x '__MACOSX/*'
  else
    "${PYTHON}" -m zipfile -e "$1" "$2"
  fi
  rm -rf "$2/__MACOSX"
}

unpack() {
  local marker
  # Images: Flickr8k_Dataset/ holds either the jpgs or the zip's Flicker8k_Dataset/ folder.
  marker="${DL}/.unpacked_images"
  if [[ ! -f "${marker}" ]]; then
    log "unpacking images"
    unzip_to "${DL}/Flickr8k_Dataset.zip" "${DIR}/Flickr8k_Dataset"
    touch "${marker}"
  fi
  # Text: flat inside Flickr8k_text/ (lifted up if the zip has its own top folder).
  marker="${DL}/.unpacked_text"
  if [[ ! -f "${marker}" ]]; then
    log "unpacking text"
    unzip_to "${DL}/Flickr8k_text.zip" "${DIR}/Flickr8k_text"
    local token
    token="$(find "${DIR}/Flickr8k_text" -maxdepth 3 -name Flickr8k.token.txt | head -n 1)"
    [[ -n "${token}" ]] || die "Flickr8k_text.zip holds no Flickr8k.token.txt"
    local tdir
    tdir="$(dirname "${token}")"
    if [[ "${tdir}" != "${DIR}/Flickr8k_text" ]]; then
      mv -f "${tdir}"/*.txt "${DIR}/Flickr8k_text/"
    fi
    touch "${marker}"
  fi
  if [[ ${WITH_AUDIO} -eq 1 ]]; then
    marker="${DL}/.unpacked_audio"
    if [[ ! -f "${marker}" ]]; then
      log "unpacking audio"
      tar -xzf "${DL}/flickr_audio.tar.gz" -C "${DIR}"
      [[ -f "${DIR}/flickr_audio/wav2capt.txt" ]] \
        || die "flickr_audio.tar.gz did not give flickr_audio/wav2capt.txt"
      touch "${marker}"
    fi
  fi
}

# md5_for URL_VAR MD5_VAR DEFAULT_URL DEFAULT_MD5: the MD5 to check.
md5_for() {
  local url_var="$1" md5_var="$2" default_url="$3" default_md5="$4"
  if [[ -n "${!md5_var+x}" ]]; then
    echo "${!md5_var}"
  elif [[ "${!url_var:-${default_url}}" == "${default_url}" ]]; then
    echo "${default_md5}"
  else
    echo ""
  fi
}

MODE=download
WITH_AUDIO=1
DIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --check) MODE=check; shift ;;
    --no-audio) WITH_AUDIO=0; shift ;;
    -h|--help) usage ;;
    -*) log "unknown option $1"; usage ;;
    *) [[ -z "${DIR}" ]] || usage; DIR="$1"; shift ;;
  esac
done
[[ -n "${DIR}" ]] || usage

if [[ "${MODE}" == check ]]; then
  [[ -d "${DIR}" ]] || die "${DIR} does not exist"
  check_dir "$(cd "${DIR}" && pwd)"
  exit $?
fi

mkdir -p "${DIR}/downloads"
DIR="$(cd "${DIR}" && pwd)"
DL="${DIR}/downloads"

download Flickr8k_Dataset.zip "${FLICKR8K_IMAGES_URL:-${DEFAULT_IMAGES_URL}}" \
  "$(md5_for FLICKR8K_IMAGES_URL FLICKR8K_IMAGES_MD5 "${DEFAULT_IMAGES_URL}" "${DEFAULT_IMAGES_MD5}")" \
  "${FLICKR8K_IMAGES_SHA256:-}"
download Flickr8k_text.zip "${FLICKR8K_TEXT_URL:-${DEFAULT_TEXT_URL}}" \
  "$(md5_for FLICKR8K_TEXT_URL FLICKR8K_TEXT_MD5 "${DEFAULT_TEXT_URL}" "${DEFAULT_TEXT_MD5}")" \
  "${FLICKR8K_TEXT_SHA256:-}"
if [[ ${WITH_AUDIO} -eq 1 ]]; then
  download flickr_audio.tar.gz "${FLICKR_AUDIO_URL:-${DEFAULT_AUDIO_URL}}" \
    "$(md5_for FLICKR_AUDIO_URL FLICKR_AUDIO_MD5 "${DEFAULT_AUDIO_URL}" "${DEFAULT_AUDIO_MD5}")" \
    "${FLICKR_AUDIO_SHA256:-}"
fi
unpack
check_dir "${DIR}"
log "done: use --config.data.root=${DIR} (downloads/ can be deleted)"
