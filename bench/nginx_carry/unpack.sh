#!/bin/sh
# Unpack the carried Debian nginx + its libraries into a private root (never into /), then check it runs.
# usage: bench/nginx_carry/unpack.sh DEB_DIR DEST   -> DEST/usr/sbin/nginx; libs under DEST/{usr/,}lib/x86_64-linux-gnu
set -eu
debs=$1 dest=$2
mkdir -p "$dest"
for f in "$debs"/*.deb; do dpkg -x "$f" "$dest"; done
export LD_LIBRARY_PATH="$dest/usr/lib/x86_64-linux-gnu:$dest/lib/x86_64-linux-gnu"
"$dest/usr/sbin/nginx" -V 2>&1 | head -1
