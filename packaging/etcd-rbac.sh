#!/bin/sh
# Users and roles for a persona fleet on etcd, then authentication on.
#
#   etcd-rbac.sh [-p PREFIX] [-d DIR] HOST...
#
# etcdctl is told where etcd is by its own environment (ETCDCTL_ENDPOINTS, and
# ETCDCTL_CACERT/ETCDCTL_CERT/ETCDCTL_KEY for TLS). Passwords are files in DIR
# (default /etc/persona/etcd): root, persona-admin and persona-host-HOST, each made
# with a random password when missing. Run it again with more hosts as the fleet grows.
#
# persona-admin may write everything under PREFIX: definitions (personas, rules,
# tokens, devices) go through a daemon started with this user. persona-host-HOST reads
# everything and writes only what an agent must: its own liveness key and device state,
# shift requests and answers, signals, orphan and migration records, the audit log and
# persona ids. Device definitions are writable to agents because a migration's target
# moves ownership in the device's own record.
set -eu

prefix=/persona/v1/
dir=/etc/persona/etcd
while getopts p:d: opt; do
    case $opt in
    p) prefix=$OPTARG ;;
    d) dir=$OPTARG ;;
    *) echo "usage: $0 [-p PREFIX] [-d DIR] HOST..." >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || { echo "usage: $0 [-p PREFIX] [-d DIR] HOST..." >&2; exit 2; }
case $prefix in /*/) ;; *) echo "$0: -p: a prefix starts and ends with /" >&2; exit 2 ;; esac
for host in "$@"; do
    case $host in
    *[!A-Za-z0-9._-]* | "") echo "$0: $host: a host name is letters, digits, . _ -" >&2; exit 2 ;;
    esac
done
export ETCDCTL_API=3
umask 077
mkdir -p "$dir"

password() {
    [ -s "$dir/$1" ] || head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"$dir/$1"
    cat "$dir/$1"
}

root="root:$(password root)"
# Without a user, etcd answers only while authentication is off.
if etcdctl user list >/dev/null 2>&1; then
    ctl() { etcdctl "$@"; }
else
    ctl() { etcdctl --user "$root" "$@"; }
fi

# Adds a user with its password and a role of its name, unless they are there.
account() {
    ctl user get "$1" >/dev/null 2>&1 ||
        ctl user add "$1" --new-user-password="$(password "$1")" >/dev/null
    ctl role get "$1" >/dev/null 2>&1 || ctl role add "$1" >/dev/null
    ctl user grant-role "$1" "$1" >/dev/null
}

ctl user get root >/dev/null 2>&1 ||
    ctl user add root --new-user-password="$(password root)" >/dev/null
ctl user grant-role root root >/dev/null

account persona-admin
ctl role grant-permission --prefix=true persona-admin readwrite "$prefix" >/dev/null

data=${prefix}data/
for host in "$@"; do
    role=persona-host-$host
    account "$role"
    ctl role grant-permission --prefix=true "$role" read "$prefix" >/dev/null
    ctl role grant-permission "$role" readwrite "${data}hosts/$host" >/dev/null
    ctl role grant-permission --prefix=true "$role" readwrite "${data}states/$host/" >/dev/null
    for shared in requests/ results/ signals/ orphans/ migrating/ migrations/ \
        persona-ids/ objects/devices/; do
        ctl role grant-permission --prefix=true "$role" readwrite "$data$shared" >/dev/null
    done
    for key in meta/event-seq meta/persona-id; do
        ctl role grant-permission "$role" readwrite "$data$key" >/dev/null
    done
    ctl role grant-permission --prefix=true "$role" readwrite "${prefix}log/" >/dev/null
done

ctl auth enable >/dev/null
echo "etcd users: root, persona-admin$(printf ', persona-host-%s' "$@"); passwords in $dir"
