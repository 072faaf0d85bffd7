#!/usr/bin/perl
# Writes a small GeoIP2-Country database: `write_mmdb.pl OUT CIDR=CC [CIDR=CC ...]`.
use strict;
use warnings;
use MaxMind::DB::Writer::Tree;

my ($out, @pairs) = @ARGV;
my %types = (country => 'map', iso_code => 'utf8_string', names => 'map', en => 'utf8_string');
my $tree = MaxMind::DB::Writer::Tree->new(
    ip_version            => 4,
    # The test ranges (192.0.2.0/24, 198.51.100.0/24) are reserved networks.
    remove_reserved_networks => 0,
    record_size           => 24,
    database_type         => 'GeoIP2-Country',
    languages             => ['en'],
    description           => { en => 'persona test database' },
    map_key_type_callback => sub { $types{ $_[0] } },
);
for my $pair (@pairs) {
    my ($cidr, $cc) = split /=/, $pair;
    $tree->insert_network($cidr, { country => { iso_code => $cc, names => { en => $cc } } });
}
open my $fh, '>:raw', $out or die "$out: $!";
$tree->write_tree($fh);
close $fh;
