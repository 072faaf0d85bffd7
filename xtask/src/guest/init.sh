#!/bin/busybox sh
# The guest's whole boot: busybox applets, the virtio network driver, the address and
# routes from the kernel command line (persona.ip=, persona.gw=, persona.ip6=,
# persona.gw6=, persona.dns=, persona.name=; persona.ip=dhcp asks the host's DHCP on the
# tap instead), a web page on ports 80, 22 and 23, then the command agent on the second
# serial port.
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
if [ "$p_ip" = dhcp ]; then
	cat >/bin/dhcp-event <<'EVENT'
#!/bin/sh
case "$1" in
bound | renew)
	ip addr flush dev "$interface"
	ip addr add "$ip/$mask" dev "$interface"
	[ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
	ip route replace default via "$router"
	echo "nameserver ${dns%% *}" >/etc/resolv.conf
	;;
esac
EVENT
	chmod +x /bin/dhcp-event
	# Until bound (then it carries on in the background, renewing), or a minute.
	udhcpc -i eth0 -t 60 -T 1 -b -s /bin/dhcp-event
	p_ip=$(ip -4 -o addr show dev eth0 | awk '{print $4}')
else
	ip addr add "$p_ip" dev eth0
	ip route add default via "$p_gw"
	echo "nameserver ${p_dns:-192.0.2.53}" >/etc/resolv.conf
fi
if [ -n "$p_ip6" ]; then
	# busybox ip has no "nodad": turn duplicate address detection off instead, so the
	# address is usable at once.
	echo 0 >/proc/sys/net/ipv6/conf/eth0/accept_dad
	ip -6 addr add "$p_ip6" dev eth0
	ip -6 route add default via "$p_gw6" dev eth0
fi
echo "${p_name:-guest}" >/www/index.html
for port in 80 22 23; do httpd -p "$port" -h /www; done
echo "persona-guest: ${p_name} up as $p_ip"
exec /bin/persona-agent /dev/ttyS1
