#!/bin/sh
# Runs each line read from the serial port as a command and answers with its output
# and, on a line of its own, @@rc=STATUS@@.
tty=$1
stty -F "$tty" raw -echo
exec <"$tty" >"$tty" 2>&1
echo "@@ready@@"
while read -r line; do
	sh -c "$line" </dev/null >/tmp/agent.out 2>&1
	rc=$?
	cat /tmp/agent.out
	echo
	echo "@@rc=$rc@@"
done
