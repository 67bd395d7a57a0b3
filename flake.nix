{
  description = "nixfs-layer: read-only lower Nix stores under a writable upper (overlayfs + merged path DB)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAll (pkgs: {
        default = pkgs.rustPlatform.buildRustPackage {
          pname = "nixfs-layer";
          version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package.version;
          src = self;
          cargoLock.lockFile = ./Cargo.lock;
          nativeBuildInputs = [ pkgs.installShellFiles ];
          # The test suite mounts overlayfs and FUSE as root in private
          # namespaces: it runs in `checks`/CI, not in the build sandbox.
          doCheck = false;
          postInstall = ''
            $out/bin/nixfs-layer generate man --out man
            installManPage man/*.1
            installShellCompletion --cmd nixfs-layer \
              --bash <($out/bin/nixfs-layer generate completions bash) \
              --zsh <($out/bin/nixfs-layer generate completions zsh) \
              --fish <($out/bin/nixfs-layer generate completions fish)
            install -Dm644 nixos/nixfs-layer.service $out/lib/systemd/system/nixfs-layer.service
            substituteInPlace $out/lib/systemd/system/nixfs-layer.service --replace-fail /usr/bin $out/bin
          '';
          meta = {
            description = "Layered Nix stores: read-only lowers under a writable upper";
            mainProgram = "nixfs-layer";
            platforms = nixpkgs.lib.platforms.linux;
          };
        };
      });

      apps = forAll (pkgs: {
        default = {
          type = "app";
          program = "${self.packages.${pkgs.system}.default}/bin/nixfs-layer";
        };
      });

      nixosModules.default = { pkgs, lib, ... }: {
        imports = [ ./nixos/module.nix ];
        services.nixfs-layer.package = lib.mkDefault self.packages.${pkgs.system}.default;
      };

      # `nix flake check` builds the package and, on x86_64-linux with KVM,
      # runs the NixOS VM tests of the vm-tests stories (vm-tests/README.md).
      # Their stacked machines boot from disk images with BIOS GRUB, and the
      # fixture flake is x86_64-linux only: no VM tests on aarch64-linux.
      checks = forAll (pkgs:
        let
          system = pkgs.stdenv.hostPlatform.system;
          vmTest = story: import (./nixos/tests + "/${story}.nix") { inherit pkgs self; };
        in
        { package = self.packages.${system}.default; }
        // nixpkgs.lib.optionalAttrs (system == "x86_64-linux")
          (nixpkgs.lib.genAttrs [ "nfs-fleet" "template-update" "spark-path" ] vmTest));

      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.system}.default ];
          packages = [ pkgs.cargo-nextest pkgs.clippy pkgs.rustfmt pkgs.fuse3 pkgs.sqlite ];
        };
      });
    };
}
