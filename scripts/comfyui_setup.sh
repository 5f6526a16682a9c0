#!/usr/bin/env bash
# One-command ComfyUI + FastWan setup for a fresh machine with internet access.
#
#   scripts/comfyui_setup.sh [options] WORKSPACE [-- COMFYUI_ARGS...]
#
# 1. comfy-cli installs ComfyUI into WORKSPACE (a new or empty folder).
# 2. This repository is linked into WORKSPACE/custom_nodes/ComfyUI-FastWan and its Python
#    dependencies are installed into ComfyUI's environment.
# 3. The three model files are downloaded into WORKSPACE/models/{diffusion_models,text_encoders,vae}
#    (files already there with the right size are kept; sizes are checked against the server's).
# 4. `comfy launch` starts ComfyUI; the FastWan workflow is in the template browser
#    (Workflow > Browse Templates > ComfyUI-FastWan).
#
# Options:
#   --gpu nvidia|amd|m-series|cpu   what comfy-cli installs PyTorch for (default: detected)
#   --reuse                         WORKSPACE already holds a ComfyUI: skip the install, only link,
#                                   install dependencies and download missing models
#   --no-launch                     stop after setting up
#   -h, --help                      this text
#
# Environment (mostly for tests, which run offline):
#   FASTWAN_SETUP_DRY_RUN=1   print what would be done, change nothing
#   FASTWAN_COMFY             comfy-cli command to use (default: `comfy` on PATH, else comfy-cli is
#                             installed into ${XDG_CACHE_HOME:-~/.cache}/fastwan/comfy-cli-venv)
#   FASTWAN_DOWNLOADER        downloader command, called as `CMD size URL` (prints the byte count,
#                             or nothing if unknown) and `CMD get URL DEST` (default: curl)
#   FASTWAN_PYTHON            Python of ComfyUI's environment (default: WORKSPACE/.venv, else the
#                             active virtualenv, else comfy-cli's own Python)
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODE_LINK_NAME="ComfyUI-FastWan"

# name|model folder|URL. The FastWan DiT is published as a diffusers transformer file; it is saved
# under the name the shipped workflow expects.
MODELS=(
  "fastwan2.1_t2v_1.3B_bf16.safetensors|diffusion_models|https://huggingface.co/FastVideo/FastWan2.1-T2V-1.3B-Diffusers/resolve/main/transformer/diffusion_pytorch_model.safetensors"
  "umt5_xxl_fp8_e4m3fn_scaled.safetensors|text_encoders|https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"
  "wan_2.1_vae.safetensors|vae|https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files/vae/wan_2.1_vae.safetensors"
)

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
say() { printf '[fastwan-setup] %s\n' "$*"; }
die() { printf '[fastwan-setup] error: %s\n' "$1" >&2; exit "${2:-1}"; }
DRY_RUN="${FASTWAN_SETUP_DRY_RUN:-0}"
[[ "$DRY_RUN" == "0" || -z "$DRY_RUN" ]] && DRY_RUN=0 || DRY_RUN=1
# Run a command, or only print it in a dry run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then printf '[fastwan-setup] would run:'; printf ' %q' "$@"; printf '\n'; return 0; fi
  "$@"
}

# ---------------------------------------------------------------------------------------------
# Arguments

GPU=""
REUSE=0
LAUNCH=1
WORKSPACE=""
EXTRA_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --gpu) [[ $# -ge 2 ]] || die "--gpu needs a value: nvidia, amd, m-series or cpu" 2; GPU="$2"; shift 2 ;;
    --gpu=*) GPU="${1#--gpu=}"; shift ;;
    --reuse) REUSE=1; shift ;;
    --no-launch) LAUNCH=0; shift ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" 2 ;;
    *) [[ -z "$WORKSPACE" ]] || die "only one WORKSPACE may be given (got '$WORKSPACE' and '$1')" 2
       WORKSPACE="$1"; shift ;;
  esac
done
[[ -n "$WORKSPACE" ]] || { usage >&2; die "missing WORKSPACE: the folder to install ComfyUI into, e.g. ~/ComfyUI-FastWan" 2; }

if [[ -z "$GPU" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then GPU=nvidia
  elif [[ "$(uname -s)" == Darwin && "$(uname -m)" == arm64 ]]; then GPU=m-series
  elif command -v rocminfo >/dev/null 2>&1; then GPU=amd
  else GPU=cpu; fi
fi
case "$GPU" in
  nvidia|amd|m-series|cpu) ;;
  *) die "--gpu must be nvidia, amd, m-series or cpu (got '$GPU')" 2 ;;
esac

[[ "$WORKSPACE" == /* ]] || WORKSPACE="$PWD/$WORKSPACE"
while [[ "$WORKSPACE" == */ && "$WORKSPACE" != / ]]; do WORKSPACE="${WORKSPACE%/}"; done
[[ "$WORKSPACE" != / ]] || die "WORKSPACE must not be the root folder" 2

# Refuse to clobber: a fresh install needs a missing or empty folder; --reuse needs a ComfyUI.
if [[ "$REUSE" == 0 ]]; then
  if [[ -e "$WORKSPACE" && ! -d "$WORKSPACE" ]]; then
    die "$WORKSPACE exists and is not a folder; choose a new folder" 3
  fi
  if [[ -d "$WORKSPACE" && -n "$(ls -A "$WORKSPACE" 2>/dev/null)" ]]; then
    die "$WORKSPACE already exists and is not empty; nothing was changed. Choose a new folder, or pass --reuse to add FastWan to the ComfyUI that is there." 3
  fi
else
  [[ -f "$WORKSPACE/main.py" && -d "$WORKSPACE/comfy" ]] \
    || die "--reuse: $WORKSPACE is not a ComfyUI folder (no main.py and comfy/); run without --reuse on a new folder" 3
fi
LINK="$WORKSPACE/custom_nodes/$NODE_LINK_NAME"
if [[ -e "$LINK" || -L "$LINK" ]]; then
  if [[ "$(cd "$LINK" 2>/dev/null && pwd -P)" != "$(cd "$REPO_DIR" && pwd -P)" ]]; then
    die "$LINK exists and is not this repository ($REPO_DIR); move it away first" 3
  fi
fi

# ---------------------------------------------------------------------------------------------
# comfy-cli

BOOTSTRAP_VENV="${XDG_CACHE_HOME:-$HOME/.cache}/fastwan/comfy-cli-venv"
comfy_cmd() {
  if [[ -n "${FASTWAN_COMFY:-}" ]]; then echo "$FASTWAN_COMFY"; return; fi
  if command -v comfy >/dev/null 2>&1; then command -v comfy; return; fi
  local venv="$BOOTSTRAP_VENV"
  if [[ ! -x "$venv/bin/comfy" ]]; then
    say "installing comfy-cli into $venv" >&2
    run python3 -m venv "$venv" >&2
    run "$venv/bin/python" -m pip install --quiet --upgrade pip comfy-cli >&2
  fi
  echo "$venv/bin/comfy"
}
COMFY="$(comfy_cmd)"
# A comfy-cli that we installed into its own venv puts ComfyUI's packages into WORKSPACE/.venv, as
# long as no other virtualenv is active; a user's own comfy-cli uses the user's environment.
comfy() {
  if [[ "$COMFY" == "$BOOTSTRAP_VENV/bin/comfy" ]]; then
    run env -u VIRTUAL_ENV -u CONDA_PREFIX "$COMFY" --skip-prompt --workspace "$WORKSPACE" "$@"
  else
    run "$COMFY" --skip-prompt --workspace "$WORKSPACE" "$@"
  fi
}

if [[ "$REUSE" == 0 ]]; then
  say "installing ComfyUI into $WORKSPACE (PyTorch for $GPU)"
  comfy install "--$GPU" \
    || die "comfy-cli could not install ComfyUI into $WORKSPACE (its message is above; it needs internet access to GitHub and PyPI). Remove the folder and run this again." 4
  [[ "$DRY_RUN" == 1 || -f "$WORKSPACE/main.py" ]] || die "comfy-cli did not install ComfyUI into $WORKSPACE" 4
fi

# ---------------------------------------------------------------------------------------------
# The node package

comfy_python() {
  if [[ -n "${FASTWAN_PYTHON:-}" ]]; then echo "$FASTWAN_PYTHON"
  elif [[ -x "$WORKSPACE/.venv/bin/python" ]]; then echo "$WORKSPACE/.venv/bin/python"
  elif [[ -x "$WORKSPACE/venv/bin/python" ]]; then echo "$WORKSPACE/venv/bin/python"
  elif [[ -n "${VIRTUAL_ENV:-}" ]]; then echo "$VIRTUAL_ENV/bin/python"
  else head -1 "$COMFY" 2>/dev/null | sed -n 's/^#! *//p' | grep python || echo python3; fi
}

run mkdir -p "$WORKSPACE/custom_nodes"
if [[ ! -L "$LINK" && ! -e "$LINK" ]]; then
  say "linking $REPO_DIR -> $LINK"
  run ln -s "$REPO_DIR" "$LINK"
fi
PYTHON="$(comfy_python)"
# The package's own dependencies, except torch/triton that ComfyUI already installed for its GPU:
# requirements.txt (what ComfyUI-Manager and `comfy node install` use), else pyproject.toml's list.
DEPS=()
if [[ -f "$REPO_DIR/requirements.txt" ]]; then
  while IFS= read -r dep; do DEPS+=("$dep"); done < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$REPO_DIR/requirements.txt" \
    | grep -v -E '^(torch|triton)([^a-zA-Z0-9_-]|$)' | grep -v '^$' || true)
else
  while IFS= read -r dep; do [[ -n "$dep" ]] && DEPS+=("$dep"); done < <(python3 - "$REPO_DIR/pyproject.toml" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M)
for dep in re.findall(r'"([^"]+)"', block.group(1) if block else ""):
    if not re.match(r"(torch|triton)\b", dep):
        print(dep)
PY
  )
fi
if [[ ${#DEPS[@]} -gt 0 ]]; then
  say "installing FastWan's dependencies into ComfyUI's Python ($PYTHON)"
  run "$PYTHON" -m pip install --quiet "${DEPS[@]}"
fi

# ---------------------------------------------------------------------------------------------
# Model files

downloader() {
  if [[ -n "${FASTWAN_DOWNLOADER:-}" ]]; then "$FASTWAN_DOWNLOADER" "$@"; return; fi
  case "$1" in
    size) curl -sIL --max-time 60 "$2" | tr -d '\r' \
            | awk 'tolower($1)=="content-length:" {n=$2} END {if (n != "") print n}' || true ;;
    get) curl -fL --retry 3 --continue-at - --progress-bar -o "$3" "$2" ;;
  esac
}
file_size() { wc -c < "$1" | tr -d ' '; }

for entry in "${MODELS[@]}"; do
  IFS='|' read -r name folder url <<<"$entry"
  dest="$WORKSPACE/models/$folder/$name"
  expected=""
  # A dry run stays offline unless a (stub) downloader is given.
  if [[ "$DRY_RUN" == 0 || -n "${FASTWAN_DOWNLOADER:-}" ]]; then expected="$(downloader size "$url" || true)"; fi
  [[ "$expected" =~ ^[0-9]+$ ]] || expected=""
  if [[ -f "$dest" ]]; then
    have="$(file_size "$dest")"
    if [[ -z "$expected" ]]; then
      say "keeping $folder/$name ($have bytes; the server did not report a size to check against)"
      continue
    elif [[ "$have" == "$expected" ]]; then
      say "keeping $folder/$name (size $have bytes matches)"
      continue
    fi
    say "$folder/$name has $have bytes, the server has $expected: downloading it again"
  fi
  say "downloading $folder/$name"
  say "  from $url"
  run mkdir -p "$WORKSPACE/models/$folder"
  run downloader get "$url" "$dest.part" || die "downloading $url failed; run the same command again to resume" 5
  if [[ "$DRY_RUN" == 0 ]]; then
    got="$(file_size "$dest.part")"
    if [[ -n "$expected" && "$got" != "$expected" ]]; then
      die "$dest.part has $got bytes but the server reported $expected; run the same command again to resume" 5
    fi
    mv -f "$dest.part" "$dest"
  fi
done

# ---------------------------------------------------------------------------------------------
# Launch

say "ComfyUI with FastWan is set up in $WORKSPACE."
say "Open the workflow from Workflow > Browse Templates > $NODE_LINK_NAME, or drag"
say "  $REPO_DIR/workflows/fastwan_t2v_480p.json into the ComfyUI window."
if [[ "$LAUNCH" == 1 ]]; then
  say "starting ComfyUI (Ctrl+C stops it)"
  if [[ ${#EXTRA_ARGS[@]} -gt 0 ]]; then comfy launch -- "${EXTRA_ARGS[@]}"; else comfy launch; fi
else
  say "start it later with: $COMFY --workspace $WORKSPACE launch"
fi
