#!/usr/bin/env bash
# the host cost of an eager step on this machine's CPU, flash's kernel replaced by a stand-in that returns at
# once (so the Python and dispatch around it are what is timed); OLD and NEW: the two versions' src folders
set -u
OLD=${OLD:?src of 46ae48a}; NEW=${NEW:?src of this tree}; H=$(dirname "$0")
for s in decoder_stub.py hf_llama_stub.py; do for mode in eval train; do for v in NEW OLD OLD NEW NEW OLD; do
  echo "$v $(PYTHONPATH=${!v} python "$H/$s" $mode 2>/dev/null | tail -1)"
done; done; done
