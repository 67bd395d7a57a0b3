# Two commands a newcomer needs (both as root, on Debian):
#   make demo   the main job end to end on a built-in example
#   make test   the whole test suite (installs nix-bin, fuse3 if missing)
# CI runs `make test TEST_ARGS=--modern-nix`: the tests that use the suite's
# Nix once more, against Debian trixie's Nix in a chroot (see scripts/test.sh).
.PHONY: demo test build

TEST_ARGS ?=

build:
	cargo build --release --locked

demo:
	scripts/demo.sh

test:
	scripts/test.sh $(TEST_ARGS)
