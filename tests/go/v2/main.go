// The AWS SDK for Go v2 (Debian's golang-github-aws-aws-sdk-go-v2-dev, 1.17) driven by
// tests/other_sdks.rs: six calls, one JSON line each (see tests/go/README.md).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/aws/smithy-go"
)

func report(id string, err error) {
	line := map[string]interface{}{"id": id, "ok": err == nil}
	if err != nil {
		var tagErr *types.TagException
		line["typed"] = errors.As(err, &tagErr)
		var apiErr smithy.APIError
		if errors.As(err, &apiErr) {
			line["code"] = apiErr.ErrorCode()
			line["message"] = apiErr.ErrorMessage()
		} else {
			line["message"] = err.Error()
		}
		var respErr *awshttp.ResponseError
		if errors.As(err, &respErr) {
			line["status"] = respErr.HTTPStatusCode()
			line["request_id"] = respErr.ServiceRequestID()
		}
	}
	out, _ := json.Marshal(line)
	fmt.Println(string(out))
}

func tags(pairs ...string) []types.Tag {
	var out []types.Tag
	for i := 0; i < len(pairs); i += 2 {
		out = append(out, types.Tag{TagKey: aws.String(pairs[i]), TagValue: aws.String(pairs[i+1])})
	}
	return out
}

func main() {
	ctx := context.Background()
	cfg, err := config.LoadDefaultConfig(ctx, config.WithRegion("us-east-1"), config.WithRetryMaxAttempts(1))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	client := kms.NewFromConfig(cfg, func(o *kms.Options) {
		if endpoint := os.Getenv("KMS_DRIVER_ENDPOINT"); endpoint != "" {
			// o.BaseEndpoint does not exist in 1.17: the resolver is the way.
			o.EndpointResolver = kms.EndpointResolverFromURL(endpoint)
		}
	})
	keyID := os.Getenv("KMS_DRIVER_KEY_ID")

	enc, err := client.Encrypt(ctx, &kms.EncryptInput{KeyId: aws.String(keyID), Plaintext: []byte("hello from go v2")})
	report("encrypt", err)
	if err == nil {
		dec, err := client.Decrypt(ctx, &kms.DecryptInput{CiphertextBlob: enc.CiphertextBlob})
		if err == nil && string(dec.Plaintext) != "hello from go v2" {
			err = fmt.Errorf("decrypted %q", dec.Plaintext)
		}
		report("decrypt", err)
	}
	_, err = client.TagResource(ctx, &kms.TagResourceInput{KeyId: aws.String(keyID), Tags: tags("team:app", "ledger", "cost:center", "4711")})
	report("tag-allowed", err)
	_, err = client.TagResource(ctx, &kms.TagResourceInput{KeyId: aws.String(keyID), Tags: tags("Project", "apollo")})
	report("tag-denied", err)
	_, err = client.CreateKey(ctx, &kms.CreateKeyInput{Description: aws.String("go v2"), Tags: tags("team:owner", "payments")})
	report("create-tagged", err)
	_, err = client.CreateKey(ctx, &kms.CreateKeyInput{Description: aws.String("go v2, no tags")})
	report("create-untagged", err)
}
