# Sourced by the scripts that install Debian packages (the caller defines `say`).
# apt_install PKG...: installs them as root or through passwordless sudo; otherwise (or
# without apt-get) says what to install and fails.
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        say "missing: $* (no apt-get here: install the equivalent packages of your distribution)"
        return 1
    fi
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            say "missing packages and not root. Run:"
            say "  sudo apt-get update && sudo apt-get install -y $*"
            return 1
        fi
    fi
    say "apt-get install $*"
    local t=$SECONDS
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        "$@" >/dev/null
    say "installed in $((SECONDS - t)) s"
}
