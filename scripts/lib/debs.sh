# Shell functions shared by the scripts that take Debian packages from another suite
# without touching the host's apt state (scripts/rust-virtiofsd, scripts/qemu-migratable,
# scripts/debian-root). Source it; it defines functions only.

# The first Debian mirror of the host's apt sources (deb822 "URIs:" lines or one-line
# "deb URI suite ..." lines; Debian's main archive, not -security nor a third party), or
# $1 when given.
debian_mirror() {
    if [ -n "${1:-}" ]; then echo "$1"; return; fi
    local m
    m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
            2>/dev/null | sed -n -e 's/^URIs:[[:space:]]*//p' \
            -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p' |
        tr ' ' '\n' | grep -E '/debian/?$' | head -n1)
    echo "${m:-http://deb.debian.org/debian}"
}

# private_apt_download TMP "SUITE..." PACKAGE...: download the .debs of PACKAGE... from
# the mirror's SUITEs into TMP/debs with a private apt (its own sources, lists, cache and
# an empty dpkg status). PACKAGE may be name/suite. Prints nothing on success.
private_apt_download() {
    local tmp=$1 suites=$2
    shift 2
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -r "$keyring" ] || { echo "$keyring missing (apt-get install debian-archive-keyring)" >&2; return 1; }
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/debs" "$tmp/etc/parts"
    : > "$tmp/etc/sources.list"
    local s
    for s in $suites; do
        echo "deb [signed-by=$keyring] $(debian_mirror "${DEBS_MIRROR:-}") $s main" >> "$tmp/etc/sources.list"
    done
    : > "$tmp/status"
    PRIVATE_APT=(-o "Dir::Etc::SourceList=$tmp/etc/sources.list" -o "Dir::Etc::SourceParts=$tmp/etc/parts"
                 -o "Dir::State::Lists=$tmp/lists" -o "Dir::Cache=$tmp/cache" -o "Dir::State::status=$tmp/status"
                 -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=$tmp/etc/parts"
                 -o "APT::Sandbox::User=root" -o "APT::Architectures=amd64")
    apt-get -q "${PRIVATE_APT[@]}" update >/dev/null
    (cd "$tmp/debs" && apt-get -q "${PRIVATE_APT[@]}" download "$@" >/dev/null)
}
