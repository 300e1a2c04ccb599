#!/usr/bin/env bash
# Run Prometheus' promtool, fetching it first when it is missing:
#
#   tools/promtool.sh check rules ops/prometheus/pullwake-alerts.yml
#   tools/promtool.sh --install-only        # just make sure it is there
#
# Uses a promtool on PATH if there is one. Otherwise takes the binary out of Debian's
# `prometheus` package (apt-get download: 19 MB once, no service, no system user, nothing
# installed system-wide) into .venv/bin/promtool (48 MB). Exit 3, with the reason on stderr,
# when it cannot be had (no apt-get, or no package lists and not root to fetch them).
set -euo pipefail
cd "$(dirname "$0")/.."
target=.venv/bin/promtool

find_promtool() {
	if [[ -x $target ]]; then
		echo "$target"
	elif command -v promtool >/dev/null 2>&1; then
		command -v promtool
	else
		return 1
	fi
}

fetch() {
	command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
		|| { echo "promtool: missing, and no apt-get/dpkg-deb to fetch Debian's prometheus package" >&2; return 3; }
	local work
	work=$(mktemp -d)
	trap 'rm -rf "$work"' RETURN
	chmod 0755 "$work"  # apt-get download drops to the _apt user where it can
	if ! (cd "$work" && apt-get download -qq prometheus >/dev/null 2>&1); then
		if [[ $(id -u) -ne 0 ]]; then
			echo "promtool: missing; 'apt-get download prometheus' failed and only root can run 'apt-get update'" >&2
			return 3
		fi
		apt-get update -qq >/dev/null \
			&& (cd "$work" && apt-get download -qq prometheus >/dev/null 2>&1) \
			|| { echo "promtool: missing, and Debian's prometheus package could not be downloaded" >&2; return 3; }
	fi
	dpkg-deb --fsys-tarfile "$work"/prometheus_*.deb | tar -x -C "$work" ./usr/bin/promtool
	mkdir -p "$(dirname "$target")"
	mv "$work/usr/bin/promtool" "$target.partial.$$"
	mv "$target.partial.$$" "$target"  # atomic: a concurrent run sees all of it or none
}

if ! promtool=$(find_promtool); then
	fetch || exit 3
	promtool=$target
fi
if [[ ${1-} == --install-only ]]; then
	exit 0
fi
exec "$promtool" "$@"
