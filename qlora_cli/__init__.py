"""`qlora`: a command-line client for the fine-tuning service's REST API.

It speaks HTTP only (httpx); it never imports the service's own packages (`api`, `shared`,
`worker`) or torch, so it installs and starts quickly anywhere. See docs/cli.md.
"""
