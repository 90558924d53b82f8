.PHONY: demo test bench package systemd-e2e clean

demo:     ## the local end-to-end story (Azurite + IMDS simulator + eviction)
	bash scripts/demo.sh

test:     ## the test suite, as CI runs it
	bash scripts/test.sh

bench:    ## throughput vs the bare SDK loop and Celery, scaling, eviction timing, chaos (docs/benchmarks.md)
	bash scripts/bench.sh

package:  ## the VM Application package (dist/spot-supervisor-<version>.tar.gz)
	bash packaging/build.sh --out dist

systemd-e2e:  ## the packaged unit under a real systemd in a container (root; issue 15)
	bash scripts/systemd-e2e.sh

clean:
	rm -rf dist build *.egg-info .pytest_cache
