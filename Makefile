# Two commands a newcomer needs (both as root, on Debian):
#   make demo   the main job end to end on a built-in example
#   make test   the whole test suite (installs nix-bin, fuse3 if missing)
.PHONY: demo test build

build:
	cargo build --release --locked

demo:
	scripts/demo.sh

test:
	scripts/test.sh
