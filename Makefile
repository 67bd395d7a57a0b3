# Two commands a newcomer needs (both as root, on Debian):
#   make demo   the main job end to end on a built-in example (installs nix-bin if missing)
#   make test   the whole test suite (installs nix-bin, fuse3 if missing)
# CI runs `make test TEST_ARGS=--modern-nix`: the tests that use the suite's
# Nix once more, against Debian trixie's Nix in a chroot (see scripts/test.sh).
#
# Installing (as root, after `make`): `make install` puts the binary, the man
# pages, bash/zsh/fish completions, the systemd unit and nix-daemon's
# drop-ins (ordered after the stack, stopped with it) under PREFIX
# (default /usr/local); DESTDIR stages it for a package; `make uninstall`
# removes the same files. BIN installs another build of the binary. The
# installed systemd unit names the binary where BINDIR puts it.
.PHONY: demo test build install uninstall

TEST_ARGS ?=
PREFIX ?= /usr/local
DESTDIR ?=
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/site-functions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
NIXOSDIR ?= $(PREFIX)/share/nixfs-layer/nixos
BIN ?= target/release/nixfs-layer

build:
	cargo build --release --locked

# Rebuilt only when a source changed, so `sudo make install` after `make`
# needs no cargo on root's PATH.
target/release/nixfs-layer: Cargo.toml Cargo.lock $(shell find src -name '*.rs')
	cargo build --release --locked

install: $(BIN)
	install -Dm755 $(BIN) $(DESTDIR)$(BINDIR)/nixfs-layer
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(BIN) generate man --out "$$tmp" && \
	  install -d $(DESTDIR)$(MANDIR)/man1 && \
	  install -m644 "$$tmp"/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -d $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	$(BIN) generate completions bash > $(DESTDIR)$(BASHCOMPDIR)/nixfs-layer
	$(BIN) generate completions zsh > $(DESTDIR)$(ZSHCOMPDIR)/_nixfs-layer
	$(BIN) generate completions fish > $(DESTDIR)$(FISHCOMPDIR)/nixfs-layer.fish
	install -d $(DESTDIR)$(SYSTEMDUNITDIR)
	sed 's|/usr/bin/nixfs-layer|$(BINDIR)/nixfs-layer|g' nixos/nixfs-layer.service \
	  > $(DESTDIR)$(SYSTEMDUNITDIR)/nixfs-layer.service
	chmod 644 $(DESTDIR)$(SYSTEMDUNITDIR)/nixfs-layer.service
	install -Dm644 nixos/nix-daemon-nixfs-layer.conf $(DESTDIR)$(SYSTEMDUNITDIR)/nix-daemon.service.d/nixfs-layer.conf
	install -Dm644 nixos/nix-daemon-nixfs-layer.conf $(DESTDIR)$(SYSTEMDUNITDIR)/nix-daemon.socket.d/nixfs-layer.conf
	install -Dm644 -t $(DESTDIR)$(NIXOSDIR) nixos/module.nix nixos/render-config.nix

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/nixfs-layer \
	  $(DESTDIR)$(MANDIR)/man1/nixfs-layer.1 $(DESTDIR)$(MANDIR)/man1/nixfs-layer-*.1 \
	  $(DESTDIR)$(BASHCOMPDIR)/nixfs-layer $(DESTDIR)$(ZSHCOMPDIR)/_nixfs-layer \
	  $(DESTDIR)$(FISHCOMPDIR)/nixfs-layer.fish \
	  $(DESTDIR)$(SYSTEMDUNITDIR)/nixfs-layer.service \
	  $(DESTDIR)$(SYSTEMDUNITDIR)/nix-daemon.service.d/nixfs-layer.conf \
	  $(DESTDIR)$(SYSTEMDUNITDIR)/nix-daemon.socket.d/nixfs-layer.conf \
	  $(DESTDIR)$(NIXOSDIR)/module.nix $(DESTDIR)$(NIXOSDIR)/render-config.nix
	-rmdir $(DESTDIR)$(SYSTEMDUNITDIR)/nix-daemon.service.d $(DESTDIR)$(SYSTEMDUNITDIR)/nix-daemon.socket.d 2>/dev/null
	-rmdir $(DESTDIR)$(NIXOSDIR) $(DESTDIR)$(PREFIX)/share/nixfs-layer 2>/dev/null

demo:
	scripts/demo.sh

test:
	scripts/test.sh $(TEST_ARGS)
