.PHONY: demo test bench package clean

demo:     ## the local end-to-end story (Azurite + IMDS simulator + eviction)
	bash scripts/demo.sh

test:     ## the test suite, as CI runs it
	bash scripts/test.sh

bench:    ## throughput vs the bare SDK loop and Celery, scaling, eviction timing, chaos (docs/benchmarks.md)
	bash scripts/bench.sh

package:  ## the VM Application package (dist/spot-supervisor-<version>.tar.gz)
	bash packaging/build.sh --out dist

clean:
	rm -rf dist build *.egg-info .pytest_cache
