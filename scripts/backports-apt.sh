# Sourced by scripts/fetch-meson.sh and scripts/fetch-peer-10.sh, with
# APTDIR set: an apt configuration of our own for bookworm-backports in
# APTDIR (its own sources.list, state, lists and cache; the system's
# apt.conf.d and trusted keys still apply, the system's sources are never
# touched), APT_OPTS to pass it to apt-get and apt-cache, and its lists
# fetched.
mkdir -p "$APTDIR/etc/sources.list.d" "$APTDIR/etc/preferences.d" \
         "$APTDIR/state/lists/partial" \
         "$APTDIR/cache/archives/partial"
cat > "$APTDIR/etc/sources.list" <<'EOF'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
EOF
: > "$APTDIR/state/status"

APT_OPTS=(
    -o "Dir::Etc::sourcelist=$APTDIR/etc/sources.list"
    -o "Dir::Etc::sourceparts=$APTDIR/etc/sources.list.d"
    -o "Dir::Etc::preferences=$APTDIR/etc/preferences"
    -o "Dir::Etc::preferencesparts=$APTDIR/etc/preferences.d"
    -o "Dir::State=$APTDIR/state"
    -o "Dir::State::lists=$APTDIR/state/lists"
    -o "Dir::State::status=$APTDIR/state/status"
    -o "Dir::Cache=$APTDIR/cache"
    -o "Dir::Cache::archives=$APTDIR/cache/archives"
    -o "Dir::Cache::pkgcache=$APTDIR/cache/pkgcache.bin"
    -o "Dir::Cache::srcpkgcache=$APTDIR/cache/srcpkgcache.bin"
    -o "Acquire::Languages=none"
    # Downloads land in folders of ours that _apt may not be able to enter.
    -o "APT::Sandbox::User=root"
)

echo "apt-get update (bookworm-backports, private config in $APTDIR)" >&2
apt-get "${APT_OPTS[@]}" -q update >&2
