#!/usr/bin/env bash
# Back up and restore what a heliosdb-tenant-replication node keeps on disk
# (deployment guide §5.1, corrected: see docs/deployment.md):
#   * checkpoint files (<checkpoint_dir>/*.checkpoint) of every tenant,
#   * the tenants' encryption keys ([encryption] key_file: a file or a keys
#     directory), which nothing else can give back,
#   * the configuration file itself.
# Spools (<checkpoint_dir>/<tenant>.spool/) are not copied: they change
# many times a second and a stale copy is worse than none (a node that
# lost a spool stops that tenant at start-up with the fix, init --resync;
# see docs/deployment.md).
#
# Usage:
#   heliosdb-backup.sh backup  --config FILE --to DEST [--retention-days N]
#   heliosdb-backup.sh restore --config FILE --from ARCHIVE [--force]
# DEST is a directory or an S3 URL (s3://bucket/prefix; S3-compatible
# stores via AWS_ENDPOINT_URL or --endpoint-url URL; needs the aws CLI).
# ARCHIVE is a file written by `backup`, local or s3://.
# Exit codes: 0 done, 2 bad usage or configuration, 3 refused (the node is
# running, or a key would be replaced: --force), 1 anything else.
set -euo pipefail

prog=$(basename "$0")
die() { echo "$prog: $2" >&2; exit "$1"; }
usage() {
  cat <<'EOT'
Usage:
  heliosdb-backup.sh backup  --config FILE --to DEST [--retention-days N] [--endpoint-url URL]
  heliosdb-backup.sh restore --config FILE --from ARCHIVE [--force] [--endpoint-url URL]
DEST: a directory or s3://bucket/prefix. ARCHIVE: a file `backup` wrote, local or s3://.
Exit codes: 0 done, 2 bad usage or configuration, 3 refused (node running, key would change), 1 other.
EOT
}

cmd=${1:-}
[[ -n $cmd ]] || { usage >&2; exit 2; }
shift
config="" dest="" from="" retention="" force=0 endpoint=""
while (($#)); do
  case $1 in
    --config) config=${2:?}; shift 2 ;;
    --to) dest=${2:?}; shift 2 ;;
    --from) from=${2:?}; shift 2 ;;
    --retention-days) retention=${2:?}; shift 2 ;;
    --endpoint-url) endpoint=${2:?}; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die 2 "unknown argument '$1' (see --help)" ;;
  esac
done
case $cmd in
  backup|restore) ;;
  -h|--help|help) usage; exit 0 ;;
  *) die 2 "unknown command '$cmd': backup or restore (see --help)" ;;
esac
[[ -n $config ]] || die 2 "--config FILE is required"
[[ -r $config ]] || die 2 "cannot read the configuration $config"

# The paths a configuration names: every checkpoint_dir (default
# /var/lib/heliosdb/checkpoints) and every [encryption] key_file, also in
# [[tenants]] entries ([tenants.cdc], [tenants.encryption]).
toml_values() { # section-suffix key
  awk -v want="$1" -v key="$2" '
    /^[[:space:]]*\[/ { s = $0; gsub(/[][[:space:]]/, "", s); sub(/^tenants\./, "", s); next }
    s == want && $0 ~ "^[[:space:]]*" key "[[:space:]]*=" {
      v = $0; sub(/^[^=]*=[[:space:]]*/, "", v); sub(/[[:space:]]*(#.*)?$/, "", v)
      gsub(/^"|"$/, "", v); print v
    }' "$config"
}
mapfile -t checkpoint_dirs < <(toml_values cdc checkpoint_dir | sort -u)
((${#checkpoint_dirs[@]})) || checkpoint_dirs=(/var/lib/heliosdb/checkpoints)
mapfile -t key_paths < <(toml_values encryption key_file | sort -u)
config_abs=$(readlink -f "$config")

aws_s3() {
  command -v aws >/dev/null || die 2 "an s3:// location needs the aws CLI (pip install awscli)"
  if [[ -n $endpoint ]]; then aws --endpoint-url "$endpoint" s3 "$@"; else aws s3 "$@"; fi
}

# A live node writes its pid in the first checkpoint directory.
node_running() {
  local d pid
  for d in "${checkpoint_dirs[@]}"; do
    pid=$(cat "$d/heliosdb-tenant-replication.pid" 2>/dev/null) || continue
    # Seen through /proc (kill -0 fails for another user's process); a
    # stale file whose pid now belongs to another program does not count.
    [[ $pid =~ ^[0-9]+$ ]] && grep -qs '^heliosdb' "/proc/$pid/comm" && return 0
  done
  return 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077

if [[ $cmd == backup ]]; then
  [[ -n $dest ]] || die 2 "--to DEST (a directory or s3://bucket/prefix) is required"
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  name="heliosdb-backup-$stamp.tar.gz"
  mkdir -p "$work/files"
  # Each file under files/<its absolute path>; checkpoint files are
  # replaced atomically by the daemon, so each copy is whole.
  keep() { mkdir -p "$work/files$(dirname "$1")"; cp -p "$1" "$work/files$1"; echo "$1" >>"$work/MANIFEST"; }
  keep "$config_abs"
  found=0
  for d in "${checkpoint_dirs[@]}"; do
    [[ -d $d ]] || { echo "$prog: note: no checkpoint directory $d yet" >&2; continue; }
    while IFS= read -r -d '' f; do keep "$(readlink -f "$f")"; found=$((found + 1)); done \
      < <(find "$d" -maxdepth 1 -type f -name '*.checkpoint' -print0)
  done
  for k in "${key_paths[@]}"; do
    if [[ -d $k ]]; then
      while IFS= read -r -d '' f; do keep "$(readlink -f "$f")"; done < <(find "$k" -type f -print0)
    elif [[ -f $k ]]; then
      keep "$(readlink -f "$k")"
    else
      die 2 "the key $k named in $config does not exist"
    fi
  done
  while IFS= read -r p; do (cd "$work" && sha256sum -- "files$p"); done <"$work/MANIFEST" >"$work/SHA256SUMS"
  tar -C "$work" -czf "$work/$name" MANIFEST SHA256SUMS files
  if [[ $dest == s3://* ]]; then
    aws_s3 cp --only-show-errors "$work/$name" "${dest%/}/$name"
  else
    mkdir -p "$dest"
    cp "$work/$name" "$dest/$name.part" && mv "$dest/$name.part" "$dest/$name"
    if [[ -n $retention ]]; then
      [[ $retention =~ ^[0-9]+$ ]] || die 2 "--retention-days must be a number of days"
      find "$dest" -maxdepth 1 -type f -name 'heliosdb-backup-*.tar.gz' -mtime +"$retention" -delete
    fi
  fi
  echo "backup ${dest%/}/$name: $found checkpoint file(s), ${#key_paths[@]} key location(s), the configuration"
  exit 0
fi

# restore
[[ -n $from ]] || die 2 "--from ARCHIVE is required"
node_running && die 3 "the node is running (pid file in ${checkpoint_dirs[0]}): stop it first (systemctl stop heliosdb-replication)"
if [[ $from == s3://* ]]; then
  aws_s3 cp --only-show-errors "$from" "$work/archive.tar.gz"
else
  [[ -r $from ]] || die 2 "cannot read $from"
  cp "$from" "$work/archive.tar.gz"
fi
mkdir -p "$work/x"
tar -C "$work/x" -xzf "$work/archive.tar.gz"
(cd "$work/x" && sha256sum --quiet -c SHA256SUMS) || die 1 "$from is damaged (checksums differ)"
restored=0
while IFS= read -r path; do
  src="$work/x/files$path"
  under=""
  for d in "${checkpoint_dirs[@]}"; do [[ $path == "$(readlink -m "$d")"/* ]] && under=checkpoint; done
  for k in "${key_paths[@]}"; do
    k=$(readlink -m "$k")
    [[ $path == "$k" || $path == "$k"/* ]] && under=key
  done
  case $under in
    checkpoint)
      mkdir -p "$(dirname "$path")"
      cp -p "$src" "$path.restore" && mv "$path.restore" "$path"
      restored=$((restored + 1)) ;;
    key)
      if [[ -e $path ]] && ! cmp -s "$src" "$path"; then
        ((force)) || die 3 "$path exists and differs from the backup's key: batches sealed with it could no longer be opened; move it away or pass --force"
      fi
      mkdir -p "$(dirname "$path")"
      cp -p "$src" "$path.restore" && chmod 600 "$path.restore" && mv "$path.restore" "$path"
      restored=$((restored + 1)) ;;
    *) ;; # the configuration, or paths this configuration no longer names
  esac
done <"$work/x/MANIFEST"
echo "restored $restored file(s) from $from; the configuration in the backup is files$config_abs inside it (not restored)"
