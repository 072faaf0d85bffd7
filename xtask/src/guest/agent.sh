#!/bin/sh
# Runs each line read from the serial port as a command and answers with its output
# and, on a line of its own, @@rc=STATUS@@. Each line comes as LENGTH:COMMAND; one whose
# length does not match lost characters on the way (a busy emulated guest) and is
# answered @@resend@@ instead of being run.
tty=$1
stty -F "$tty" raw -echo
exec <"$tty" >"$tty" 2>&1
echo "@@ready@@"
while IFS= read -r line; do
	want=${line%%:*}
	cmd=${line#*:}
	if [ "$want" != "${#cmd}" ]; then
		echo "@@resend@@"
		continue
	fi
	sh -c "$cmd" </dev/null >/tmp/agent.out 2>&1
	rc=$?
	cat /tmp/agent.out
	echo
	echo "@@rc=$rc@@"
done
