# ctest tests of the native runners; included by the top-level CMakeLists.txt.
#   ctest --test-dir build --output-on-failure
# With -DVAE_TEST_PACKAGE=model.pt2 (tests/native/make_package.py writes one) the parity and
# wrong-latent-shape tests run too; pytest tests/native does all of this without the option.
set(_native_tests "${CMAKE_CURRENT_LIST_DIR}")
set(_scratch "${CMAKE_CURRENT_BINARY_DIR}/native_test_files")
file(MAKE_DIRECTORY "${_scratch}")
file(WRITE "${_scratch}/corrupt.pt2" "this is not a zip archive\n")

add_executable(npy_selftest "${_native_tests}/npy_selftest.cpp")
target_link_libraries(npy_selftest PRIVATE vae_native_common)
add_test(NAME native.npy_selftest COMMAND npy_selftest "${_scratch}")

add_test(NAME vae_sample.help COMMAND vae_sample --help)
set_tests_properties(vae_sample.help PROPERTIES PASS_REGULAR_EXPRESSION "usage: vae_sample PACKAGE")

# vae_expect_failure(NAME REGEX RC ARGS...): vae_sample ARGS must exit RC with one line ~ REGEX.
function(vae_expect_failure name regex rc)
  add_test(NAME vae_sample.${name}
           COMMAND "${CMAKE_COMMAND}" "-DEXPECT=${regex}" "-DEXPECT_RC=${rc}"
                   -P "${_native_tests}/expect_failure.cmake" -- $<TARGET_FILE:vae_sample> ${ARGN})
endfunction()

vae_expect_failure(missing_package "error: package '.*no_such\\.pt2' not found" 1
                   "${_scratch}/no_such.pt2" --n 2 --out "${_scratch}/x.npy")
vae_expect_failure(corrupt_package "error: package .* is not an AOTInductor \\.pt2" 1
                   "${_scratch}/corrupt.pt2" --n 2 --out "${_scratch}/x.npy")
vae_expect_failure(missing_output_dir "error: output directory '.*no_such_dir' .* does not exist" 2
                   "${_scratch}/corrupt.pt2" --n 2 --out "${_scratch}/no_such_dir/x.npy")
vae_expect_failure(bad_integer "error: --n expects an integer, got 'two'" 2
                   "${_scratch}/corrupt.pt2" --n two --out "${_scratch}/x.npy")
vae_expect_failure(unknown_option "error: unknown option '--frobnicate'" 2
                   "${_scratch}/corrupt.pt2" --frobnicate 1)

if(VAE_TEST_PACKAGE)
  file(WRITE "${_scratch}/make_bad_latents.py"
       "import numpy as np, sys; np.save(sys.argv[1], np.zeros((3, 999), np.float32))\n")
  execute_process(COMMAND "${Python3_EXECUTABLE}" "${_scratch}/make_bad_latents.py"
                          "${_scratch}/bad_latents.npy")
  vae_expect_failure(wrong_latent_shape "error: wrong latent shape in .*bad_latents\\.npy" 1
                     "${VAE_TEST_PACKAGE}" --latents "${_scratch}/bad_latents.npy"
                     --out "${_scratch}/x.npy")
  add_test(NAME vae_sample.parity
           COMMAND "${Python3_EXECUTABLE}" "${_native_tests}/parity.py"
                   --binary $<TARGET_FILE:vae_sample> --package "${VAE_TEST_PACKAGE}"
                   --workdir "${_scratch}")
  set_tests_properties(vae_sample.parity PROPERTIES
                       ENVIRONMENT "PYTHONPATH=${PROJECT_SOURCE_DIR}")
else()
  message(STATUS "vae-engine: ctest parity test off (pass -DVAE_TEST_PACKAGE=model.pt2)")
endif()
