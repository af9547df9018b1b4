#!/bin/bash
# Install what `make bench` needs on top of scripts/install-deps.sh:
# gnuplot (the chart), GNU time (/usr/bin/time), python3 (the report) and
# qemu-utils (the reference peer: Debian's qemu-img/qemu-io with the original
# QED driver).
exec "$(dirname "$0")/install-deps.sh" gnuplot-nox time python3 qemu-utils
