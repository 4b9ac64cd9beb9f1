# The closure scripts/bench serves, built by the real nix without nixpkgs (builder /bin/sh).
#   n small paths: small-0 … small-(n-1); small-i references small-((i-1)/2), a binary tree of
#     depth log2(n), so narinfos carry real References lines without a long chain that would
#     serialise `nix copy` (it copies references first).
#   bigCount big paths of bigMiB MiB of random data each (incompressible: what NAR throughput
#     is measured with).
#   root references every path above, so `nix copy ROOT` copies n + bigCount + 1 paths.
{ n ? 500, bigCount ? 3, bigMiB ? 64, salt ? "cellar-bench-1" }:
let
  mk = name: script: builtins.derivation {
    inherit name salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" script ];
  };
  smalls = builtins.genList (i:
    mk "small-${toString i}" (
      if i == 0 then "echo small-0 > $out"
      else "echo small-${toString i} ${builtins.elemAt smalls ((i - 1) / 2)} > $out"
    )) n;
  bigs = builtins.genList (i:
    mk "big-${toString bigMiB}m-${toString i}"
      "head -c ${toString (bigMiB * 1048576)} /dev/urandom > $out") bigCount;
  root = mk "root" ''
    mkdir $out
    echo ${toString smalls} > $out/smalls
    echo ${toString bigs} > $out/bigs
  '';
in { inherit root; }
