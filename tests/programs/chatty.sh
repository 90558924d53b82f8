#!/bin/sh
# One 200 MB line without a newline on stdout, then 20000 short lines on stderr.
head -c 200000000 /dev/zero | tr '\0' 'x'
echo
seq 1 20000 >&2
