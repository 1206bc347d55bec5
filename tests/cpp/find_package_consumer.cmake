# ctest find_package_consumer: installs the built pirope into a fresh prefix under
# WORK_DIR, then configures, builds and runs tests/cpp/consumer against that prefix only
# (no torch cmake path: the package has to bring LibTorch itself).
#   cmake -DBUILD_DIR=... -DCONFIG=... -DWORK_DIR=... -DCONSUMER_DIR=... -DGENERATOR=...
#         -DMAKE_PROGRAM=... -DCXX_COMPILER=... -DVERSION=... -P find_package_consumer.cmake
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    list(JOIN ARGN " " cmd)
    message(FATAL_ERROR "failed (${rc}): ${cmd}")
  endif()
endfunction()

# From scratch each time, so that nothing left by an earlier install or build can stand
# in for what the install rules miss.
file(REMOVE_RECURSE "${WORK_DIR}")
run("${CMAKE_COMMAND}" --install "${BUILD_DIR}" --config "${CONFIG}" --prefix "${WORK_DIR}/prefix")
run("${CMAKE_COMMAND}" -S "${CONSUMER_DIR}" -B "${WORK_DIR}/build" -G "${GENERATOR}"
    "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}" "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" "-DCMAKE_BUILD_TYPE=${CONFIG}"
    "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix" "-DPIROPE_EXPECTED_VERSION=${VERSION}"
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
run("${CMAKE_COMMAND}" --build "${WORK_DIR}/build" --config "${CONFIG}")
if(EXISTS "${WORK_DIR}/build/${CONFIG}/consumer")  # multi-config generators
  run("${WORK_DIR}/build/${CONFIG}/consumer")
else()
  run("${WORK_DIR}/build/consumer")
endif()
