#!/bin/sh
# Appends "<CUDA_VISIBLE_DEVICES> <parent pid>" to $PROG_EVENTS (shell builtins only: PATH may be bare).
echo "${CUDA_VISIBLE_DEVICES:-unset} $PPID" >> "$PROG_EVENTS"
