#!/usr/bin/env bash
# FA4's one op pair (branch fa4-one-pair's attention/fa4.py, flash.py, tests) on the warm machine
set -u
export PYTHONPATH="$PWD/src" PYTHONWARNINGS=ignore
start=$SECONDS
bash benchmarks/fa4_wheels.sh install .fa4/b > $OUT/fa4_install.txt 2>&1; echo "install exit $? after $((SECONDS - start)) s" >> $OUT/fa4_install.txt
tail -2 $OUT/fa4_install.txt
python3 -m pytest -q -m gpu tests/test_gpu.py -k "fa4 and (qkvpacked or smoke_backend)" -p no:cacheprovider > $OUT/fa4_tests.txt 2>&1; echo "exit $? after $((SECONDS - start)) s" >> $OUT/fa4_tests.txt
tail -4 $OUT/fa4_tests.txt
python3 -m pytest -q -m gpu tests/test_gpu.py -k "fa4 and not qkvpacked and not smoke_backend" -p no:cacheprovider > $OUT/fa4_tests2.txt 2>&1; echo "exit $? after $((SECONDS - start)) s" >> $OUT/fa4_tests2.txt
tail -4 $OUT/fa4_tests2.txt
