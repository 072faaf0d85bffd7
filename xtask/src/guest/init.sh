#!/bin/busybox sh
# The guest's whole boot: busybox applets, the virtio network driver, the address and
# routes from the kernel command line (persona.ip=, persona.gw=, persona.ip6=,
# persona.gw6=, persona.dns=, persona.name=), a web page on ports 80, 22 and 23, then the
# command agent on the second serial port.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m"; done
for kv in $(cat /proc/cmdline); do
	case "$kv" in
	persona.*=*) k=${kv%%=*}; k=${k#persona.}; eval "p_$k=\${kv#*=}" ;;
	esac
done
hostname "${p_name:-guest}"
ip link set lo up
i=0
until ip link show eth0 >/dev/null 2>&1 || [ $i -ge 50 ]; do usleep 100000; i=$((i + 1)); done
ip link set eth0 up
ip addr add "$p_ip" dev eth0
ip route add default via "$p_gw"
if [ -n "$p_ip6" ]; then
	# busybox ip has no "nodad": turn duplicate address detection off instead, so the
	# address is usable at once.
	echo 0 >/proc/sys/net/ipv6/conf/eth0/accept_dad
	ip -6 addr add "$p_ip6" dev eth0
	ip -6 route add default via "$p_gw6" dev eth0
fi
echo "nameserver ${p_dns:-192.0.2.53}" >/etc/resolv.conf
echo "${p_name:-guest}" >/www/index.html
for port in 80 22 23; do httpd -p "$port" -h /www; done
echo "persona-guest: ${p_name} up as $p_ip"
exec /bin/persona-agent /dev/ttyS1
